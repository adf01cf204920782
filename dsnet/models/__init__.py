"""The built-in models; importing this package registers them (``dsnet.registry``)."""

from dsnet.models import mobilenet, resnet, slimmable, vit  # noqa: F401  (their @register_model decorators run)
