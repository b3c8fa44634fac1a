"""examples/coupled_solve.ipynb runs top to bottom in a fresh kernel of this Python.

The kernel is started from a kernelspec written into a temporary directory by ipykernel itself
(argv = [sys.executable, "-m", "ipykernel_launcher", ...]), not looked up by the name "python3":
which kernelspec that name finds depends on JUPYTER_PATH, JUPYTER_PREFER_ENV_PATH and the
user's own kernelspecs, any of which may point at another interpreter.
"""

import itertools
import json
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "examples" / "coupled_solve.ipynb"
KERNEL_NAME = "anodev2-test-python"
# Appended to the in-memory copy only: what the checks below read from the kernel's state.
REPORT_CELL = """import json, sys
print(json.dumps({
    "executable": sys.executable,
    "prefix": sys.prefix,
    "gaps": gaps,
    "dto_vs_backprop": relative_difference(dto, backprop),
    "exponential_theta0": float(jnp.max(jnp.abs(thetas["exponential, λ = 4"][0]))),
    "dirac_theta_is_w": all(bool(jnp.all(t == w)) for t, w in zip(thetas["Dirac: θ = w"], ws)),
    "kernel_weight_at_1": float(jnp.sum(kappa[-1])),
}))"""


def _report(cell: nbformat.NotebookNode) -> dict:
    text = "".join(o["text"] for o in cell.outputs if o.get("name") == "stdout")
    return json.loads(text)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(executed notebook, report dict), one kernel start for the whole module."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL_NAME)
    km = AsyncKernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    # Raises CellExecutionError, with the traceback, on the first cell that fails.
    client = NotebookClient(
        nb, km=km, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    return nb, _report(nb.cells[-1])


def test_notebook_is_committed_with_outputs_cleared():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_kernel_is_this_python(executed):
    _, report = executed
    assert report["executable"] == sys.executable
    assert report["prefix"] == sys.prefix


def test_every_figure_is_drawn(executed):
    nb, _ = executed
    plotting = [c for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]
    # Figure 3's kernel grid, the DTO/OTD convergence plot, θ(t) through three time kernels
    assert len(plotting) >= 3
    for cell in plotting:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, cell.source[:60]


def test_otd_gradient_approaches_dto_as_num_z_steps_grows(executed):
    _, report = executed
    expected_groups = {"RDA": {"z0", "w0", "p", "b"}, "static": {"z0", "w0", "b"}}
    assert set(report["gaps"]) == set(expected_groups)
    for block, by_nz in report["gaps"].items():
        nzs = sorted(by_nz, key=int)  # JSON made the Nz keys strings
        assert int(nzs[0]) == 2 and int(nzs[-1]) >= 16
        for group in expected_groups[block]:
            gaps = [by_nz[n][group] for n in nzs]
            # The Neural ODE adjoint is really inexact at the paper's Nz = 2 ...
            assert gaps[0] > 0.1, (block, group, gaps)
            # ... and its O(h) error shrinks at every refinement (about 1/Nz: 16x from 2 to 32).
            assert all(b < a for a, b in itertools.pairwise(gaps)), (block, group, gaps)
            assert gaps[-1] < gaps[0] / 5, (block, group, gaps)


def test_dto_is_the_backprop_gradient(executed):
    _, report = executed
    assert report["dto_vs_backprop"] < 1e-5


def test_time_kernels_show_theta_as_the_paper_defines_it(executed):
    _, report = executed
    assert report["dirac_theta_is_w"]
    assert report["exponential_theta0"] == 0.0  # no Dirac part: θ(0) = 0
    # trapezoid weight of λe^{-λs} over [0, 1], λ = 4, δ = 0.05: ≈ 1 - e^{-4} = 0.9817
    assert abs(report["kernel_weight_at_1"] - 0.98168) < 0.01
