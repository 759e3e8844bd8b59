"""Install story: the ORT training wheel is the only distribution of the `onnxruntime` package."""

from __future__ import annotations

import importlib.metadata


def test_onnxruntime_and_onnxruntime_training_never_both_installed():
    providers = importlib.metadata.packages_distributions().get("onnxruntime", [])
    assert sorted(set(providers)) == ["onnxruntime-training-cpu"]
    for plain in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-training"):
        try:
            importlib.metadata.distribution(plain)
        except importlib.metadata.PackageNotFoundError:
            continue
        raise AssertionError(f"{plain} is installed next to onnxruntime-training-cpu")


def test_ort_training_and_pinned_onnx_versions():
    assert importlib.metadata.version("onnxruntime-training-cpu") == "1.19.2"
    major, minor = (int(x) for x in importlib.metadata.version("onnx").split(".")[:2])
    assert (major, minor) < (1, 18)  # ORT 1.19.2 reads ONNX IR <= 10
    from onnxruntime.training import api  # the training API is really there

    assert hasattr(api, "CheckpointState")
