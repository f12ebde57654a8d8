"""Model registry and architectures. Importing this package registers every architecture."""

from medai.models import densenet, efficientnet, hybrid, resnet, vit  # noqa: F401  (registration)
from medai.models.registry import create_model, architectures, register_model

__all__ = ["create_model", "architectures", "register_model"]
