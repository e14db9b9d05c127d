import pytest
import torch

# Every operator test runs on each device this machine has; CUDA joins the
# list by itself on a GPU machine, so nothing is skipped silently.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread; every run a module compares
    uses the same count, so float reductions are the same too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def batch():
    """A left-padded batch of three random prompts (57, 40 and 64 tokens)
    for the integration tests' tiny models."""
    from integration_models import prompts

    return prompts([57, 40, 64])
