import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class TinyExtractor(torch.nn.Module):
    """A random two-tap conv net with the FeatureExtractor attributes (strides 8 and 16)."""

    def __init__(self, name="tiny", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8),
                                        torch.nn.Tanh())
        self.deep = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.Tanh())
        self.name, self.layers = name, ("stem", "deep")
        self.normalization = {"name": name, "weights": f"random-{seed}", "layers": ["stem", "deep"]}
        self.eval()

    def forward(self, x):
        a = self.stem(x)
        return [a, self.deep(a)]


@pytest.fixture
def tiny_extractor():
    return TinyExtractor()


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny iterations: on a shared 2-core box every multi-threaded parallel region (torch parallelises
    ``exp`` even for 100 elements) can wait a scheduler slice, so such test modules run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
