"""A cluster run's results back through DVC: the outputs in the DVC remote, the entries in dvc.lock.

A Kubeflow run computes the same outputs as ``dvc repro`` (each step calls the stage function the
DVC stage's command calls), but as artifacts and workspace folders rather than files of a
checkout. :func:`lock_run` lays them out as a checkout would hold them — a *project view*:
dvc.yaml, the run's params.yaml, the code the stages depend on (copied from the installed
``spo`` package, whose files are the repository's ``src/spo`` files at the commit the image was
built from) and each output at its dvc.yaml path — and records the stages without running them
(``dvc commit --force``), so dvc.lock gets exactly the deps, params and outs entries
``dvc repro`` would have written. :func:`push_run` pushes the view's cache to the project's
DVC remote (an S3-compatible bucket, or a folder) and puts the run's dvc.lock, params.yaml and
:func:`bundle_run`'s ``results.tar.gz`` under ``<remote>/runs/<run id>/``.

On a laptop, in a checkout of that commit: unpack ``results.tar.gz`` (dvc.lock, params.yaml and
the outputs dvc.yaml keeps out of the cache, ``cache: false``: metrics, reports, plots, the judge
cache), ``dvc pull -r <remote>`` restores the cached outputs, and ``dvc status`` / ``dvc repro``
find nothing to do.

Credentials never pass through here: the S3 client reads them from the environment
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, which the pipeline sets from a Kubernetes
Secret) and nothing writes them to .dvc/config, a log or an artifact.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spo.errors import MissingCacheError

log = logging.getLogger("spo.dvc_sync")

CODE_PREFIX = "src/spo/"
# what the repository's .dvcignore must hold for the hashes to agree between a laptop's checkout
# (compiled __pycache__ in the code deps, DVC's .gitignore files in models/policy) and the view
DEFAULT_DVCIGNORE = "__pycache__/\n*.pyc\n.gitignore\n"
RUN_FILES = ("dvc.lock", "params.yaml", "results.tar.gz")  # under <remote>/runs/<run id>/
_CODE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


def code_root() -> Path:
    """The installed ``spo`` package: its files are the repository's ``src/spo`` files."""
    import spo

    return Path(spo.__file__).resolve().parent


@contextmanager
def _repo(view: Path) -> Iterator[Any]:
    """The view's DVC repo, with the working directory inside it (DVC's API resolves some paths,
    e.g. the run cache's, against the working directory)."""
    from dvc.repo import Repo

    before = os.getcwd()
    os.chdir(view)
    try:
        with Repo(str(view)) as repo:
            yield repo
    finally:
        os.chdir(before)


def _link_or_copy(source: str, target: str) -> str:
    """A hard link where the file system allows one (a model folder on the workspace is not
    copied), else a copy."""
    try:
        os.link(source, target, follow_symlinks=True)
    except OSError:
        shutil.copy2(source, target)
    return target


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy)
    elif source.is_file():
        _link_or_copy(str(source), str(target))
    else:
        raise FileNotFoundError(f"{source}: the run output for {target.name} does not exist")


def _configure_view(repo: Any, view: Path) -> None:
    with repo.config.edit("repo") as conf:
        conf["core"]["analytics"] = False
        conf["core"]["check_update"] = False
        # DVC's state/index database beside the view: nothing written outside it (read-only root file systems)
        conf["core"]["site_cache_dir"] = str(view / ".dvc" / "site_cache")
        # outputs enter the cache as hard links where they can: a model folder is not held twice
        conf["cache"]["type"] = "hardlink,copy"


def _stages(repo: Any, names: Sequence[str] | None) -> list[Any]:
    stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
    if names is None:
        return stages
    by_name = {s.addressing: s for s in stages}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {sorted(by_name)}")
    return [by_name[n] for n in names]


def lock_run(view_dir: str | Path, outputs: Mapping[str, str | Path], params_text: str, dvc_yaml_text: str, *,
             dvcignore_text: str | None = None, stages: Sequence[str] | None = None,
             code: str | Path | None = None) -> str:
    """Record a run's outputs as ``dvc repro`` would have: returns the text of the view's dvc.lock.

    ``outputs`` maps each dvc.yaml path the stages write or read (``data/validated``,
    ``models/policy/dpo``, ``metrics/judge.json``, ...) to where the run left it; ``params_text``
    is the run's whole params.yaml, ``dvc_yaml_text`` / ``dvcignore_text`` the repository's
    dvc.yaml and .dvcignore. ``stages`` (default: all) are the stages to record; every path they
    name outside ``src/spo/`` must be in ``outputs``, and nothing else may be. The code deps come
    from ``code`` (default: the installed ``spo`` package). ``view_dir`` must be new or empty;
    the outputs are hard-linked into it where possible.
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    view = Path(view_dir)
    if view.exists() and any(view.iterdir()):
        raise FileExistsError(f"{view}: the project view must be a new or empty folder")
    view.mkdir(parents=True, exist_ok=True)
    (view / "dvc.yaml").write_text(dvc_yaml_text, encoding="utf-8")
    (view / "params.yaml").write_text(params_text, encoding="utf-8")
    (view / ".dvcignore").write_text(DEFAULT_DVCIGNORE if dvcignore_text is None else dvcignore_text, encoding="utf-8")
    Repo.init(str(view), no_scm=True).close()
    source_code = Path(code) if code is not None else code_root()
    with _repo(view) as repo:
        _configure_view(repo, view)
    with _repo(view) as repo:
        scope = _stages(repo, stages)
        outs = {out.def_path: None for stage in scope for out in stage.outs}
        needed: dict[str, None] = dict(outs)
        code_deps: dict[str, None] = {}
        for stage in scope:
            for dep in stage.deps:
                path = dep.def_path
                if isinstance(dep, ParamsDependency):  # params.yaml: written above
                    continue
                if path.startswith(CODE_PREFIX):
                    code_deps[path] = None
                elif not any(path == o or o.startswith(path + "/") or path.startswith(o + "/") for o in outs):
                    needed[path] = None  # an input the recorded stages do not write themselves
        missing = [p for p in needed if p not in outputs]
        extra = sorted(set(outputs) - set(needed))
        if missing or extra:
            raise ValueError(f"run outputs do not match dvc.yaml: missing {missing}, not in dvc.yaml {extra}")
        for path in code_deps:
            source = source_code / path[len(CODE_PREFIX):]
            (view / path).parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, view / path, ignore=_CODE_IGNORE, dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy2(source, view / path)
            else:
                raise FileNotFoundError(f"{source}: code dependency {path} of dvc.yaml is not in the spo package")
        for path in needed:
            _place(Path(outputs[path]), view / path)
        names = [s.addressing for s in scope]
        for name in names:
            repo.commit(name, force=True)
    with _repo(view) as repo:  # read back as a fresh checkout would: nothing left to do
        status = repo.status(targets=names)
    if status:
        raise RuntimeError(f"{view}: dvc status after recording the run is not clean: {status}")
    log.info("dvc lock: %d stage(s) recorded in %s", len(names), view / "dvc.lock")
    return (view / "dvc.lock").read_text(encoding="utf-8")


def uncached_outputs(view_dir: str | Path) -> list[str]:
    """The recorded outputs dvc.yaml keeps out of the cache (``cache: false``): ``dvc pull`` does
    not restore them, :func:`bundle_run` carries them."""
    import yaml

    lock = yaml.safe_load((Path(view_dir) / "dvc.lock").read_text(encoding="utf-8")) or {}
    recorded = set(lock.get("stages", {}))
    with _repo(Path(view_dir)) as repo:
        return sorted({out.def_path for stage in _stages(repo, None) if stage.addressing in recorded
                       for out in stage.outs if not out.use_cache})


def bundle_run(view_dir: str | Path, target: str | Path) -> Path:
    """``results.tar.gz``: dvc.lock, params.yaml and the uncached outputs, at their paths in a
    checkout (unpack it in the repository root). Reproducible: the same files give the same bytes."""
    view = Path(view_dir)
    return bundle_files({m: view / m for m in ["dvc.lock", "params.yaml", *uncached_outputs(view)]}, target)


def bundle_files(members: Mapping[str, str | Path], target: str | Path) -> Path:
    """A reproducible ``.tar.gz`` of ``members`` (name in the archive -> file or folder)."""
    files: list[tuple[str, Path]] = []
    for name, source in members.items():
        source = Path(source)
        if source.is_dir():
            files += [(f"{name}/{p.relative_to(source).as_posix()}", p)
                      for p in sorted(source.rglob("*")) if p.is_file()]
        else:
            files.append((name, source))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    return target


def check_remote_url(url: str) -> str:
    """A DVC remote URL (``s3://bucket/prefix``, or a folder), refused when it embeds credentials."""
    if not url:
        raise ValueError("the DVC remote URL is empty")
    parts = urlsplit(url)
    if parts.username or parts.password or parts.query:
        raise ValueError("the DVC remote URL must not carry credentials or a query string (they come from "
                         "the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    return url


def push_run(view_dir: str | Path, remote_url: str, *, endpoint_url: str | None = None, region: str | None = None,
             remote_name: str = "cluster", run_id: str | None = None, jobs: int | None = None) -> dict[str, Any]:
    """``dvc push`` the view's recorded outputs to ``remote_url``; with ``run_id``, also put
    dvc.lock, params.yaml and :func:`bundle_run`'s archive under ``<remote>/runs/<run_id>/``.

    Only the URL, endpoint and region enter the view's .dvc/config; the S3 credentials come from
    the environment. Returns what was pushed (no secret in it)."""
    view = Path(view_dir)
    check_remote_url(remote_url)
    if run_id is not None and (not run_id or "/" in run_id or run_id in (".", "..")):
        raise ValueError(f"run id {run_id!r} is not one folder name")
    if not (parts := urlsplit(remote_url)).scheme or len(parts.scheme) == 1:  # a folder (or C:\...)
        remote_url = str(Path(remote_url).resolve())
    with _repo(view) as repo:
        with repo.config.edit("repo") as conf:
            remote: dict[str, Any] = {"url": remote_url}
            if endpoint_url:
                remote["endpointurl"] = endpoint_url
            if region:
                remote["region"] = region
            conf["remote"][remote_name] = remote
            conf["core"]["remote"] = remote_name
    with _repo(view) as repo:
        # DVC itself only warns (naming an md5) and pushes the rest: refuse before anything is sent
        status = repo.status(cloud=True, remote=remote_name, jobs=jobs)
        missing = sorted(path for path, state in status.items() if state == "missing")
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise MissingCacheError(
                f"{view}: {len(missing)} recorded output file(s) are in neither the DVC cache "
                f"({view / '.dvc' / 'cache'}) nor remote {remote_name!r}: {shown}; nothing was pushed "
                "(rerun the stage that writes them, or restore them, then push again)", missing)
        pushed = repo.push(remote=remote_name, jobs=jobs)
        uploaded: list[str] = []
        if run_id:
            bundle = bundle_run(view, view / ".dvc" / "tmp" / "results.tar.gz")
            target = repo.cloud.get_remote(remote_name)
            folder = target.fs.join(target.path, "runs", run_id)
            target.fs.makedirs(folder, exist_ok=True)
            for name, source in zip(RUN_FILES, (view / "dvc.lock", view / "params.yaml", bundle)):
                target.fs.put_file(str(source), target.fs.join(folder, name))
                uploaded.append(name)
    summary = {"remote": remote_name, "url": remote_url, "endpoint_url": endpoint_url, "pushed": pushed,
               "run_files": f"{remote_url.rstrip('/')}/runs/{run_id}/" if run_id else None, "uploaded": uploaded}
    log.info("dvc push: %d file(s) to remote %r (%s%s)%s", pushed, remote_name, remote_url,
             f", endpoint {endpoint_url}" if endpoint_url else "",
             f"; run files in {summary['run_files']}" if run_id else "")
    return summary


def read_run_bundle(bundle: str | Path) -> dict[str, bytes]:
    """The members of a ``results.tar.gz`` (path -> bytes): what unpacking it into a checkout writes."""
    with tarfile.open(bundle, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def unpack_run_bundle(bundle: str | Path, checkout: str | Path) -> list[str]:
    """Unpack ``results.tar.gz`` into a checkout (the laptop side of a cluster run): dvc.lock,
    params.yaml and the uncached outputs; returns the paths written. Refuses members that would
    land outside the checkout."""
    root = Path(checkout).resolve()
    written = []
    for name, data in read_run_bundle(bundle).items():
        target = (root / name).resolve()
        if root not in target.parents:
            raise ValueError(f"{bundle}: member {name!r} is outside the checkout")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(name)
    return written
