"""``torch_ref.py`` with its model wrapped in ``torch.compile`` (run by the torch venv's python).

    $HOME/torch-venv/bin/python benchmarks/torch_compiled.py ../shared/bench/torch_ref.py \\
        bench --model alexnet --variant anodev2_c1 --channels-last --json

The first argument is torch_ref.py; the rest are its own. Its FLOP count runs on the model
before compiling (FlopCounterMode does not see into compiled graphs); the compile happens in
its warm-up steps, so the timed steps are the compiled ones.
"""

import sys
from pathlib import Path

import torch

torch_ref_path = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(torch_ref_path.parent))
import torch_ref  # noqa: E402

build, count_flops = torch_ref.build, torch_ref.count_flops
torch_ref.build = lambda *args, **kwargs: torch.compile(build(*args, **kwargs))
torch_ref.count_flops = lambda model, x, y: count_flops(getattr(model, "_orig_mod", model), x, y)
sys.argv = [str(torch_ref_path), *sys.argv[2:]]
torch_ref.main()
