"""Tasks, one module each; importing this package registers them all with bench.registry."""
from tasks import cifar, digits, fashion_mnist, imagenet, iwslt14, label_noise, svhn  # noqa: F401
