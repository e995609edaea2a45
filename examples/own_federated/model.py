"""A researcher's own model: metaopt calls ``make_model(input_shape, num_classes)`` once per client and once for
the server, and federates the parameters of the ``torch.nn.Module`` it returns."""

from torch import nn


def make_model(input_shape, num_classes):
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, num_classes),
    )
