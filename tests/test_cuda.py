"""The CUDA tier: every path of tests/test_half_precision.py on `cuda:0`, and with part of the
model offloaded to CPU memory (`--device-map auto --max-memory`), against the CPU's results.

Marked `cuda`: deselected where torch sees no GPU (conftest.py says how many in the summary),
run on a GPU machine (scripts/gpu_check.sh). Both dtypes are compared with float32 on the CPU, within
the bfloat16 tolerances of test_half_precision.py: a GPU's float32 kernels round differently from
the CPU's, by less than bfloat16 does.
"""

from __future__ import annotations

import os

import pytest

from test_half_precision import compare_runs, run_every_path

pytestmark = pytest.mark.cuda

# The GPU; `cpu` in the device check's dry run (scripts/gpu_check.sh --cpu-dry-run), which runs
# this tier's logic, its fixtures and its data on the CPU before GPU minutes are spent on it.
DEVICE = os.environ.get("SUPERWEIGHT_TEST_CUDA_DEVICE", "cuda:0")

# The tiny model is ~0.2 MB in float32: 100 KB on the GPU puts some decoder layers in CPU memory.
PLACEMENTS = {
    "cuda0": ["--device", DEVICE],
    "offload": ["--device-map", "auto", "--max-memory", "0=100KB,cpu=1GiB"],
}


@pytest.fixture(scope="module")
def cpu_float32_runs(byte_llama_dir, harness_tasks, tmp_path_factory):
    # The reference of both dtypes: bfloat16 on the GPU is held to float32 on the CPU within
    # bfloat16's tolerances, as test_half_precision.py holds the CPU's bfloat16. A CPU bfloat16
    # reference would add ~50 s (CPUs without bfloat16 units) to a tier that has 180 s of the device check.
    return run_every_path(byte_llama_dir, "float32", ["--device", "cpu"], tmp_path_factory.mktemp("cpu-float32"),
                          harness_tasks)


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_path_on_the_gpu_matches_the_cpu(dtype, placement, byte_llama_dir, harness_tasks, cpu_float32_runs,
                                               tmp_path):
    offloaded = placement == "offload"
    # Streaming reads one layer at a time (no device map); quantize refuses an offloaded model.
    runs = run_every_path(byte_llama_dir, dtype, PLACEMENTS[placement], tmp_path, harness_tasks,
                          stream=not offloaded, quantize=not offloaded)
    compare_runs(runs, cpu_float32_runs, "bfloat16", expect_dtype=dtype)  # a GPU rounds within bfloat16's bounds
    for name in ("eval_choice", "eval_wikitext"):
        for result in runs[name]["configurations"]:
            assert result["config"]["device"].startswith(DEVICE.partition(":")[0]), result["config"]["device"]


def test_smollm2_detection_on_the_gpu(smollm2, tmp_path):
    from test_half_precision import SMOLLM2_FOUND, coordinates, invoke

    for dtype in ("float32", "bfloat16"):
        for extra in ([], ["--stream"]):
            found = invoke("detect", smollm2.model.name_or_path, "--dtype", dtype, "--device", DEVICE, *extra,
                           "--out", tmp_path / f"{dtype}{'-stream' if extra else ''}.yaml")
            assert coordinates(found) == SMOLLM2_FOUND, (dtype, extra)
