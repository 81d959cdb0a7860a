"""Shared fixtures: tiny configs, offline Hub, wandb disabled, the real teacher (cached per session)."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = dict(d_model=32, n_layers=2, n_heads=2, num_codes=16, kmer_buckets=1024, window_size=16, kmer_pool=2,
            teacher_dim=24, decoder_hidden=48)


@pytest.fixture
def tiny_config():
    return dict(TINY)


@pytest.fixture
def tiny_model(tiny_config):
    from vqvae_phase1_model import KmerVQVAE
    torch.manual_seed(0)
    return KmerVQVAE(**tiny_config)


@pytest.fixture(scope="session")
def teacher_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("teacher_cache"))
