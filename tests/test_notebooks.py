"""The Colab notebooks under ``colab/`` are well formed and run top to bottom.

The structural checks read the notebooks as JSON and always run. Executing them needs
``nbclient``, ``nbformat`` and ``ipykernel`` (the ``test`` extra); without them those tests
are skipped with the reason. Each notebook runs in its own ``python3`` kernel (the
interpreter running pytest) in a temporary working directory, with the repository root on
``PYTHONPATH`` so the kernel imports this checkout's pamjax, and with IPython, matplotlib and
Jupyter state kept in the temporary directory, so nothing is written elsewhere.
``01_pamattention`` runs with four forced host CPU devices so that its sharded section takes
the multi-device path (tier padding and collectives).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = {
    "00_quickstart": {},
    "01_pamattention": {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    },
    "02_learned_scheduling": {},
}
"""Notebook name -> extra kernel environment."""

CELL_TIMEOUT_S = 300
MISSING = [m for m in ("nbformat", "nbclient", "ipykernel") if importlib.util.find_spec(m) is None]


def _load(name: str) -> dict:
    with open(COLAB / f"{name}.ipynb", encoding="utf-8") as f:
        return json.load(f)


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_structure(name):
    nb = _load(name)
    assert nb["nbformat"] == 4
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = nb["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                f"{name}: outputs must be cleared")
    badge = _source(cells[0])
    assert cells[0]["cell_type"] == "markdown"
    assert "colab-badge.svg" in badge
    assert f"github/OWNER/pamjax/blob/main/colab/{name}.ipynb" in badge
    install = _source(cells[1])
    assert cells[1]["cell_type"] == "code"
    assert 'find_spec("pamjax") is None' in install
    assert "git+https://github.com/OWNER/pamjax" in install
    first_code = [_source(c) for c in cells if c["cell_type"] == "code"][:6]
    assert any("jax.jit(jax.vmap(" in src for src in first_code), (
        f"{name}: jax.jit(jax.vmap(...)) should appear within the first code cells")


@pytest.mark.skipif(bool(MISSING), reason=f"notebook execution needs {', '.join(MISSING)} "
                    "(pip install nbformat nbclient ipykernel)")
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    work = tmp_path / "work"
    work.mkdir()
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "MPLCONFIGDIR": str(tmp_path / "matplotlib"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        **NOTEBOOKS[name],
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    # An extra last cell (in memory only) reports which pamjax the kernel imported.
    nb.cells.append(nbformat.v4.new_code_cell(
        "import pathlib, pamjax\n"
        "print('PAMJAX_AT', pathlib.Path(pamjax.__file__).resolve().parent)"))
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            startup_timeout=120, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the traceback, on the first error

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
    assert f"PAMJAX_AT {ROOT / 'pamjax'}" in text, "the kernel imported another pamjax"
    written = {p.relative_to(work).parts[0] for p in work.rglob("*")}
    assert written <= {"notebook-out"}, f"{name} wrote outside notebook-out/: {written}"
    if name == "01_pamattention":
        assert "4 device(s)" in text and "(1 empty)" in text, text
        assert "all-reduce" in text, text
