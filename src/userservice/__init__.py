"""userservice: the user.v1.UserService gRPC microservice."""

__version__ = "0.1.0"
