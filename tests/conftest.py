import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter, which must be on before any kernel is decorated, i.e. before
# omni_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_checkpoints import omni_config_dict, save_reference_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
# cuDNN convolutions default to TF32 on Ampere and later (matmuls do not): fp32 references on a GPU must be fp32.
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """Factory: ``reference_checkpoint(**config_overrides)`` -> (folder, transformers model), built once per config."""
    built = {}

    def build(seed: int = 0, max_shard_size: str | None = None, **overrides):
        key = (seed, max_shard_size, repr(sorted(overrides.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp("ckpt")
            model = save_reference_checkpoint(folder, omni_config_dict(**overrides), seed, max_shard_size)
            built[key] = (folder, model)
        return built[key]

    return build
