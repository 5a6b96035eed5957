"""`lrlm:tiny-llama-tinystories`: built once into the cache, even by runs started at once on an empty cache."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from lightning_rlm.models import base_model


def test_two_runs_on_an_empty_cache_pretrain_the_base_model_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LRLM_CACHE_DIR", str(tmp_path))
    commands = []

    def pretrain(cmd, check):  # the `lightning-rlm fit` subprocess: exports into the folder it is given
        commands.append(cmd)
        export = Path(cmd[cmd.index("--model.init_args.export_dir") + 1])
        export.mkdir(parents=True)
        time.sleep(0.5)
        (export / "config.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(base_model.subprocess, "run", pretrain)
    found = []
    threads = [threading.Thread(target=lambda: found.append(base_model.build("tiny-llama-tinystories")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = base_model.base_model_dir("tiny-llama-tinystories")
    assert len(commands) == 1 and found == [out, out]
    assert base_model.is_built("tiny-llama-tinystories") and (out / "config.json").is_file()
    assert base_model.resolve_model_path("lrlm:tiny-llama-tinystories") == str(out) and len(commands) == 1
