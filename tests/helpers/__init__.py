"""What the tests share, each defined once: servers, tokens, users, ports, processes, PKI, JWKS.

Test modules import from here (``from helpers.servers import running_app``), never from one
another; pyproject's pytest ``pythonpath`` puts tests/ on the import path.
"""
