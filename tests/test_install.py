"""The installed stack works together (the traps listed in README "Installing")."""
import pytest


def test_opencv_pyiqa_and_torchvision_import_and_work():
    import cv2
    import numpy as np
    import pyiqa
    import torch
    import torchvision

    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert cv2.resize(img, (8, 8), interpolation=cv2.INTER_AREA).shape == (8, 8, 3)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0]  # the op CUDA-only wheels lack
    psnr = pyiqa.create_metric("psnr", device="cpu")
    x = torch.rand(1, 3, 16, 16)
    assert psnr(x, x.clamp(0, 0.99)).item() > 20


@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
def test_pkg_resources_for_clip_metrics():
    import pkg_resources  # noqa: F401  (openai-clip imports it; setuptools < 82 keeps it)
