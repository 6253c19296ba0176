"""Tasks, one module each; importing this package registers them all with bench.registry."""
from tasks import cifar, digits, label_noise  # noqa: F401
