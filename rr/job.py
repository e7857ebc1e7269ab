"""A job: the validated config, its output directory (the checkpoint) and the lazily loaded model, task and embedder."""

from __future__ import annotations

import json
import logging
import os
import random
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from rr.config import RESULT_STAGES, JobConfig, dump_config, read_yaml, stages_redone
from rr.core.files import atomic_write_text
from rr.errors import ConfigError, JobDirError, RRError

log = logging.getLogger("rr")


# rr writes this file into every job directory it creates: the proof that the directory is rr's own, so rr may
# tighten its mode. A directory without it was made by someone else and is never chmod-ed.
JOB_DIR_MARKER = ".rr-job-dir"


def _others_can_access(mode: int) -> bool:
    return bool(mode & 0o077)


def check_job_dir(path: Path) -> bool:
    """Whether `path` is an existing job directory rr made (True) or a new path (False); refuses (JobDirError),
    touching nothing, a path that is not a directory, belongs to another user, or, not made by rr, lets others in:
    forget data must stay owner-only."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise JobDirError(f"output_dir / --output {path}: cannot inspect it ({exc.strerror or exc}); choose a "
                          "directory you own") from None
    import stat

    if not stat.S_ISDIR(info.st_mode):
        raise JobDirError(f"output_dir / --output {path}: exists and is not a directory; choose another path")
    if info.st_uid != os.geteuid():
        raise JobDirError(f"output_dir / --output {path}: belongs to another user (uid {info.st_uid}); a job "
                          "directory holds forget data and must be yours: choose a new path (rr creates it 0700)")
    marker = path / JOB_DIR_MARKER
    made_by_rr = marker.is_file() and marker.stat().st_uid == os.geteuid()
    if not made_by_rr and _others_can_access(info.st_mode):
        raise JobDirError(f"output_dir / --output {path}: an existing directory rr did not create, and others can "
                          f"access it (mode {stat.S_IMODE(info.st_mode):o}); forget data must stay owner-only. Pass "
                          "a new path, e.g. --output "
                          f"{path / 'rr-job'} (rr creates it 0700), or make this one private yourself (chmod 700)")
    return made_by_rr


def _with_current_defaults(saved: dict) -> dict:
    """A saved job config as this version of rr writes it: keys added since it was saved take their
    defaults, which keep the old behaviour, so upgrading rr does not refuse an unfinished job."""
    from pydantic import ValidationError

    try:
        return yaml.safe_load(dump_config(JobConfig.model_validate(saved)))
    except (ValidationError, RRError, ValueError):  # keys this version no longer has: compare as saved
        return saved


class Job:
    """Owns everything a stage needs; stages read and write only under `self.dir`."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.dir = Path(config.output_dir).resolve()
        # Everything is checked before anything is written: a refused job leaves the directory as it found it.
        made_by_rr = check_job_dir(self.dir)
        current = dump_config(self.config.model_copy(update={"output_dir": Path(".")}))
        self._check_same_config(current)
        if not self.dir.exists():
            try:
                self.dir.mkdir(parents=True, mode=0o700)
                os.chmod(self.dir, 0o700)  # ours: mkdir's mode passes through the umask
                atomic_write_text(self.dir / JOB_DIR_MARKER, "made by rr: this job directory holds forget data\n")
            except OSError as exc:
                raise JobDirError(f"output_dir / --output: cannot create {self.dir} ({exc.strerror or exc}); choose a "
                                  "writable directory") from None
        elif made_by_rr and _others_can_access(self.dir.stat().st_mode):
            os.chmod(self.dir, 0o700)  # rr's own directory, opened up since: forget data lives here
        try:
            atomic_write_text(self.dir / "config.yaml", current)
        except OSError as exc:
            raise JobDirError(f"output_dir / --output {self.dir}: cannot write config.yaml ({exc.strerror or exc}); "
                              "choose a writable directory") from None
        self._seed_everything()

    def _check_same_config(self, current: str) -> None:
        """Resuming is only sound for the same config: refuse to mix two jobs in one directory. Reads only; the
        caller writes `current` once every check has passed."""
        path = self.dir / "config.yaml"
        if not (path.exists() or path.is_symlink()):
            return
        saved_data = read_yaml(path, "job directory's config.yaml")  # size-capped, UTF-8, no aliases
        if not isinstance(saved_data, dict):
            raise ConfigError(f"{path}: not a job config rr wrote (its top level is "
                              f"{'empty' if saved_data is None else 'a ' + type(saved_data).__name__}); this "
                              f"directory holds something else: pass another --output, or delete {path} to start "
                              "a new job here")
        now = yaml.safe_load(current)
        if saved_data == now:
            return
        # Each section declares the stages its change redoes (rr/config.py: redoes); none: resume.
        changed, stages = stages_redone(JobConfig, _with_current_defaults(saved_data), now)
        if not stages:
            return
        if len(changed) > 12:
            changed = changed[:12] + [f"… {len(changed) - 12} more"]
        # a redone stage redoes every later one
        redo = RESULT_STAGES[min(RESULT_STAGES.index(stage) for stage in stages):]
        raise RRError(f"{path}: this job directory was made with a different config (changed: "
                      f"{', '.join(changed)}). Resume with the same config, pass another --output for a new "
                      f"job, or delete {', '.join(stage + '/' for stage in redo)} and config.yaml in {self.dir} to "
                      "redo those stages")

    def _seed_everything(self) -> None:
        import torch

        random.seed(self.config.seed)
        np.random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)
        if self.config.compute.threads:
            torch.set_num_threads(self.config.compute.threads)

    # ---- resources, loaded once --------------------------------------------------------
    @cached_property
    def device(self) -> str:
        from rr.models import pick_device

        return pick_device(self.config.compute.device)

    @cached_property
    def model_and_tokenizer(self):
        from rr.models import load_model_and_tokenizer

        m = self.config.model
        log.info("loading model %s", m.name_or_path)
        return load_model_and_tokenizer(m.name_or_path, m.gguf_file, m.dtype, self.device, m.revision, m.hf_token_env)

    @property
    def model(self):
        return self.model_and_tokenizer[0]

    @property
    def tokenizer(self):
        return self.model_and_tokenizer[1]

    @cached_property
    def generator(self):
        backend = self.config.generation.backend
        if backend == "vllm":
            from rr.generation.vllm import VLLMGenerator

            return VLLMGenerator.from_config(self.config, self.dir)
        from rr.generation.hf import job_generator

        return job_generator(self)

    @cached_property
    def executor(self):
        """Where generation, candidate scoring and PEM training run (rr/execution): in this process, or on Ray."""
        from rr.execution import make_executor

        return make_executor(self)

    def close(self, release_model: bool = False) -> None:
        """Release the executor's workers (Ray actors) and a vLLM engine, and with `release_model` the model
        loaded in this process; the job directory keeps everything (what is used again is loaded again)."""
        if "executor" in self.__dict__:
            self.__dict__.pop("executor").close()
        generator = self.__dict__.pop("generator", None)
        if hasattr(generator, "close"):  # vLLM: its engine process and memory reservation
            generator.close()
        if release_model:
            self.__dict__.pop("model_and_tokenizer", None)

    @cached_property
    def embedder(self):
        from rr.models import load_embedder

        return load_embedder(self.config.model.embedder, self.device)

    def embed(self, texts) -> np.ndarray:
        return np.asarray(self.embedder.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                               convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    @cached_property
    def tracker(self):
        """The job's MLflow recorder (its calls do nothing when tracking.enabled is false)."""
        from rr.tracking import Recorder

        return Recorder(self)

    @cached_property
    def task(self):
        from rr.tasks.registry import build_task

        return build_task(self.config.task, seed=self.config.seed)

    # ---- small I/O helpers ---------------------------------------------------------------
    def write_json(self, relative: str, payload) -> Path:
        path = self.dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(payload, indent=2, default=str))
        return path

    def read_json(self, relative: str):
        path = self.dir / relative
        return json.loads(path.read_text()) if path.exists() else None
