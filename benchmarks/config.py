"""The problem sizes of the default run and of ``--quick``, and the targets the tables judge (CPU; issues 6, 13)."""

from __future__ import annotations

from typing import Any

KINDS = ("cp", "tucker", "tt", "tr")

TARGET_LIMIT = 1.25  # planned / limit, every factorization and batch, forward and forward+backward
TARGET_UNPLANNED = 5.0  # unplanned torch.einsum / planned, small batches
TARGET_MEMORY = 4.0  # measured forward memory / (B*(I+O+R+sum N) + params) elements, as bytes
TARGET_GATE = 8.0  # entmax15 / torch.softmax on PyTorch, the four gate shapes
TARGET_FORWARD = 4.5  # default CP layer forward / x @ W (768 x 768), PyTorch, B = 64
TARGET_BACKWARD = 3.5  # its forward+backward / a linear layer's
TARGET_MILLION = 8.0  # million-expert CP forward / x @ W, PyTorch
TARGET_PEERS = {"lucidrains-moe": 1.0, "peer": 1.5}  # tensormoe CP / peer at matched parameters, B = 1024


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "I": 32, "O": 32, "N": 16, "batches": [8], "grad_batches": [8], "small_batch": 8,
            "ranks": {"cp": 8, "tucker": [4, 4, 4], "tt": [1, 4, 4, 1], "tr": [2, 4, 4, 2]},
            "repeats": 3, "dense_ns": [16, 64], "dense_cap": 2**17, "dense_repeats": 2, "linear_kinds": ["cp"],
            "linear_batch": 8, "unplanned_kinds": ["cp"], "unplanned_batches": [8], "rss_subprocess": False,
            "unplanned_extras": False, "million": [32, 32], "million_batch": 8, "gate_rank": 4,
            "scaling_ns": [16, [4, 4]], "scaling_batch": 8, "scaling_rank": 4,
            "scaling_batches": [1], "scaling_batch_n": 16, "scaling_batch_rank": 8,
            "scaling_rank_n": 16, "scaling_ranks": [8], "scaling_repeats": 2,
            # JAX compiles every new function and shape: --quick keeps its share small
            "grad_backends": ["pytorch"], "gate_candidates": ["numpy", "pytorch"], "firstcall_backends": ["numpy", "pytorch"],
            "gate_shapes": [[8, 32]], "numpy_timeout": 5.0, "limit_gate_budget": 0.1,
            "overhead_batch": 1, "overhead_ranks": {"cp": 4, "tucker": [2, 2, 2], "tt": [1, 2, 2, 1], "tr": [2, 2, 2, 2]},
            "peers_batches": [8], "peers_dim": 32, "peers_experts": 16, "compile_batches": [1],
            "compile_kinds": ["cp"], "compile_backend": "aot_eager", "firstcall_batch": 64, "firstcall_sizes": 1,
        }
    return {
        "I": 768, "O": 768, "N": 1024, "batches": [1, 64, 1024, 8192], "grad_batches": [1, 64, 1024, 8192],
        "small_batch": 4,
        "ranks": {"cp": 256, "tucker": [64, 64, 64], "tt": [1, 32, 32, 1], "tr": [8, 16, 16, 8]},
        "repeats": 25, "dense_ns": [8, 32, 128, 512], "dense_cap": 2**27, "dense_repeats": 2, "linear_kinds": list(KINDS),
        "linear_batch": 64, "unplanned_kinds": list(KINDS), "unplanned_batches": [64, 4], "rss_subprocess": True,
        "unplanned_extras": True, "million": [1024, 1024], "million_batch": 64, "gate_rank": 64,
        "scaling_ns": [1, 64, 1024, 16384, [16, 16], [64, 64], [256, 256], [1024, 1024]],
        "scaling_batch": 64, "scaling_rank": 64,
        "scaling_batches": [1, 16, 64, 256, 1024, 8192], "scaling_batch_n": 1024, "scaling_batch_rank": 256,
        "scaling_rank_n": 1024, "scaling_ranks": [16, 64, 256, 1024], "scaling_repeats": 5,
        "grad_backends": ["pytorch", "jax"], "gate_candidates": ["numpy", "pytorch", "jax"],
        "firstcall_backends": ["numpy", "pytorch", "jax"],
        "gate_shapes": [[64, 1024], [512, 1024], [64, 16384], [4096, 64]], "numpy_timeout": 2.0,
        "limit_gate_budget": 0.5,
        "overhead_batch": 1, "overhead_ranks": {"cp": 32, "tucker": [16, 16, 16], "tt": [1, 8, 8, 1], "tr": [4, 8, 8, 4]},
        "peers_batches": [64, 1024], "peers_dim": 768, "peers_experts": 1024, "compile_batches": [1, 64],
        "compile_kinds": list(KINDS), "compile_backend": "inductor", "firstcall_batch": 512, "firstcall_sizes": 5,
    }
