"""Shared fixtures: one run per installed backend, hypothesis profiles, the ``slow`` marker.

The quick subset, ``python -m pytest -m "not slow"``, leaves out the tests listed in
``SLOW`` (each took 2 s or more on a 2-core machine) and runs every Hypothesis
property with the ``quick`` profile (5 examples instead of 20) unless
``HYPOTHESIS_PROFILE`` says otherwise.  It still runs every factorization on every
installed backend (``tests/test_every_factorization.py``).  The full suite,
``python -m pytest``, is what CI runs.
"""

from __future__ import annotations

import os
import re

import pytest
from _pytest.doctest import DoctestItem as _DoctestItem
from hypothesis import HealthCheck, settings

import tensormoe

# Hypothesis profiles.  "ci" is the default: a stated number of examples per test,
# no deadline (JAX compiles each new shape once, which a deadline would count).
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "quick",
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Tests left out of the quick subset: ``path::function`` (every parametrization), each about 2 s
#: or more on a busy 2-core machine (``python -m pytest --durations=0``).  A test that is not listed
#: runs in both; tests/test_every_factorization.py checks that every name here still exists.
SLOW = {
    "tensormoe/jax.py": ["tensormoe.jax"],  # the module doctest: compiles a training step
    "tests/test_backend.py": ["test_default_is_numpy_without_environment",
                              "test_jax_backend_does_not_switch_process_to_float64"],
    "tests/test_benchmarks.py": ["test_hand_chain_equals_layer_and_dense_reference", "test_quick_run"],
    "tests/test_cli.py": ["test_python_dash_m_runs_without_torch_or_jax", "test_sweep_and_plot_write_a_png"],
    "tests/test_compress.py": ["test_from_linear_on_every_backend"],
    "tests/test_docs.py": ["test_markdown_snippets_run"],
    # the peer row imports PEER_pytorch and einx (about 2 s; skipped where PEER-pytorch is absent, as in CI)
    "tests/test_examples.py": ["test_demo_prints_the_same_output_on_every_backend_and_times_a_linear_layer",
                               "test_compare_routers_peer_row_on_the_product_key_grid_within_the_budget"],
    # the multi-process and multi-device runs (one launch each, shared by every test of the file)
    "tests/test_distributed_jax.py": ["test_data_parallel_equals_one_device", "test_data_parallel_all_reduces_every_gradient_once",
                                      "test_rank_parallel_equals_one_device",
                                      "test_rank_parallel_forward_holds_one_all_reduce_of_the_output",
                                      "test_rank_parallel_step_all_reduces_only_rows", "test_data_times_rank_mesh_equals_one_device"],
    "tests/test_distributed_torch.py": ["test_data_parallel_equals_one_process_on_the_whole_batch",
                                        "test_rank_parallel_equals_one_process", "test_sharded_checkpoint_round_trips",
                                        "test_bytes_per_step_match_the_accounting"],
    "tests/test_file_fuzz.py": ["test_hostile_files_under_a_memory_cap"],
    "tests/test_gpt_mmoe.py": ["test_quick_run_trains_and_analyses"],
    "tests/test_fuzz.py": ["test_fuzz_inputs_and_coefficients_jax"],
    "tests/test_gate_rank.py": ["test_jax_both_factors_learn_under_jit",
                                "test_low_rank_layer_equals_its_dense_forward_and_the_full_gate_layer",
                                "test_router_logits_are_those_of_the_product",
                                "test_save_load_round_trip_and_files_from_before_gate_rank",
                                "test_torch_both_factors_learn_and_the_mlp_freezes_the_second_gates"],
    "tests/test_gates.py": ["test_a_million_experts_keep_the_simplex", "test_both_methods_equal_the_reference_and_each_other",
                            "test_edge_rows", "test_gate_matches_reference_and_lies_on_simplex",
                            "test_gradients_equal_between_methods_and_the_closed_form",
                            "test_methods_agree_on_many_experts",
                            "test_newton_under_jax_jit_and_grad_is_finite_with_masks",
                            "test_torch_compile_full_graph_runs_the_kernel_or_the_sort_method"],
    "tests/test_gradients.py": ["test_jax_gradients_equal_dense_gradients",
                                "test_jax_gradients_through_the_gates_match_torch",
                                "test_torch_gradients_match_finite_differences"],
    "tests/test_io.py": ["test_save_on_any_backend_load_on_any_other_bit_for_bit",
                         "test_trained_in_pytorch_serves_in_numpy_and_jax"],
    "tests/test_jax.py": ["test_grad_is_a_layer_a_step_lowers_the_loss_and_no_float64_leaks",
                          "test_layer_is_a_pytree_of_its_parameters", "test_layers_of_one_configuration_share_one_trace",
                          "test_jit_of_a_layer_equals_numpy", "test_plans_are_reused_across_traces",
                          "test_vmap_and_wrap"],
    # the property over random factorizations; the quick subset has tests/test_every_factorization.py
    "tests/test_layers.py": ["test_expert_slice_equals_slice_of_dense_tensor",
                             "test_factorized_forward_equals_dense_forward", "test_given_coefficients_are_used",
                             "test_same_weights_same_outputs_on_every_backend"],
    "tests/test_lowering.py": ["test_candidates_of_a_large_plan_agree_on_every_backend"],
    "tests/test_numerics.py": ["test_nan_parameter_reaches_every_row",
                               "test_non_finite_inputs_propagate_to_their_row_only",
                               "test_rounding_error_is_within_the_documented_bound"],
    "tests/test_routers.py": ["test_any_hierarchy_of_routers_equals_the_dense_reference",
                              "test_aux_losses_against_numpy_reference", "test_compare_routers_example_quick",
                              "test_default_router_is_the_mmoe_gate", "test_every_backend_routes_alike",
                              "test_expert_choice_takes_the_top_tokens_of_each_expert",
                              "test_noisy_top_k_reference_and_reproducibility",
                              "test_routing_is_a_jax_pytree_under_grad", "test_soft_moe_equals_its_dense_definition",
                              "test_sparse_path_equals_dense_path_with_zeroed_coefficients",
                              "test_ties_select_the_lowest_indices_on_every_backend",
                              "test_top_k_selects_the_largest_logits"],
    "tests/test_site.py": ["*"],  # builds the docs site and drives a browser
    "tests/test_threads.py": ["test_concurrent_layers_on_different_backends_compute_correctly",
                              "test_first_loads_from_many_threads_keep_jax_float32"],
    "tests/test_torch.py": ["test_torch_compile_full_graph", "test_training_step_lowers_the_loss"],
    "tests/test_train_digits.py": ["test_quick_run_on_every_backend"],
    "tests/test_validation.py": ["test_empty_batches_give_empty_outputs"],
}


def pytest_configure(config):
    quick = re.search(r"\bnot\s+slow\b", config.getoption("markexpr", "") or "")
    if quick and "HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("quick")


def _is_slow(nodeid: str) -> bool:
    path, _, name = nodeid.partition("::")
    names = SLOW.get(path, ())
    return "*" in names or re.sub(r"\[.*", "", name) in names


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item.nodeid):
            item.add_marker(pytest.mark.slow)

from helpers import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test inside ``backend_context`` of each installed backend."""
    with tensormoe.backend_context(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _doctest_backend(request):
    """Doctests run on NumPy, whatever TENSORMOE_BACKEND says."""
    if isinstance(request.node, _DoctestItem):
        with tensormoe.backend_context("numpy"):
            yield
    else:
        yield
