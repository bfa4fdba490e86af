"""A cluster run's results back through DVC (spo.lineage.dvc_sync and the pipeline's publish step).

The slow tests run ``dvc repro`` once (a module fixture) in a small project copy and treat its
outputs as a cluster run's: recorded in a fresh project view by ``lock_run`` (the dvc.lock must
be the one ``dvc repro`` wrote), pushed to a local-folder remote and to a loopback S3 endpoint (a
moto server, through dvc-s3), then pulled into a fresh clone of the project definition, as a
laptop user would: every output byte-identical, ``dvc status`` clean, ``dvc repro`` idle, and the
S3 keys (environment only) in no file anywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from pipeline_helpers import _dvc_out as _dvc
from pipeline_helpers import _env, fresh_clone, lock_outs, pull_and_check, small_project

from spo.errors import InputError
from spo.lineage.dvc_sync import bundle_run, lock_run, push_run, read_run_bundle, uncached_outputs

ACCESS_KEY = "AKIASPOTESTKEY4242XY"          # distinctive: grepped for in every file the tests leave
SECRET_KEY = "spo-secret-never-in-a-file-0xC0FFEE"


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory, hh_slice: Path) -> Path:
    """The 12 stages, run once by `dvc repro` in a small project copy: the stand-in for a cluster run."""
    work = small_project(tmp_path_factory.mktemp("repro"))
    _dvc(work, "repro", "-q", env=_env(hh_slice))
    return work


@pytest.fixture(scope="module")
def view(repro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's outputs recorded in a fresh project view (what the publish step builds)."""
    view = tmp_path_factory.mktemp("view") / "view"
    lock_run(view, lock_outs(repro), (repro / "params.yaml").read_text(), (repro / "dvc.yaml").read_text(),
             dvcignore_text=(repro / ".dvcignore").read_text())
    return view


@pytest.mark.slow
def test_lock_run_records_exactly_what_dvc_repro_wrote(repro: Path, view: Path) -> None:
    assert yaml.safe_load((view / "dvc.lock").read_text()) == yaml.safe_load((repro / "dvc.lock").read_text())
    uncached = uncached_outputs(view)
    assert {"metrics/judge.json", "reports/report.md", "plots", "outputs/judge_cache.sqlite"} <= set(uncached)
    assert "data/validated" not in uncached and "models/policy/dpo" not in uncached


@pytest.mark.slow
def test_push_to_a_folder_remote_and_pull_into_a_fresh_clone(repro: Path, view: Path, tmp_path: Path,
                                                             hh_slice: Path) -> None:
    remote = tmp_path / "remote"
    summary = push_run(view, str(remote), remote_name="local", run_id="run-1")
    assert summary["pushed"] > 0 and summary["uploaded"] == ["dvc.lock", "params.yaml", "results.tar.gz"]
    run_files = remote / "runs" / "run-1"
    assert (run_files / "dvc.lock").read_bytes() == (view / "dvc.lock").read_bytes()
    assert set(read_run_bundle(run_files / "results.tar.gz")) >= {"dvc.lock", "params.yaml", "metrics/sft.json"}
    env = _env(hh_slice)
    clone = fresh_clone(tmp_path, [["add", "local", str(remote)]], env)
    pull_and_check(clone, run_files / "results.tar.gz", repro, "local", env)
    assert (clone / "params.yaml").read_bytes() == (repro / "params.yaml").read_bytes()  # the run's, not the repo's
    # pushing the same run again uploads nothing: the remote is content-addressed
    assert push_run(view, str(remote), remote_name="local")["pushed"] == 0


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on a loopback port with the bucket ``spo-dvc``; the keys only in the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    # port 0: the server binds a free port itself. A port probed and released beforehand could be
    # taken by another process in between, and then start() would wait forever for its thread.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="spo-dvc")
        yield endpoint
    finally:
        server.stop()


@pytest.mark.slow
def test_push_to_s3_and_pull_into_a_fresh_clone_with_no_key_in_any_file(
        repro: Path, view: Path, tmp_path: Path, hh_slice: Path, s3_endpoint: str) -> None:
    import boto3

    summary = push_run(view, "s3://spo-dvc/spo", endpoint_url=s3_endpoint, run_id="run-2")
    assert summary["pushed"] > 0 and ACCESS_KEY not in json.dumps(summary) and SECRET_KEY not in json.dumps(summary)
    env = _env(hh_slice)
    clone = fresh_clone(tmp_path, [["add", "cluster", "s3://spo-dvc/spo"],
                                    ["modify", "cluster", "endpointurl", s3_endpoint]], env)
    # the laptop side of the docs: the run's files straight from the bucket
    _dvc(tmp_path, "get-url", "-q", "s3://spo-dvc/spo/runs/run-2/results.tar.gz", str(tmp_path / "results.tar.gz"),
         "--fs-config", f"endpointurl={s3_endpoint}", env=env)
    pull_and_check(clone, tmp_path / "results.tar.gz", repro, "cluster", env)

    config = (view / ".dvc" / "config").read_text()
    assert f"endpointurl = {s3_endpoint}" in config and "url = s3://spo-dvc/spo" in config
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket="spo-dvc")["Contents"]]
    assert "spo/runs/run-2/dvc.lock" in objects and any(k.startswith("spo/files/md5/") for k in objects)
    stored = [s3.get_object(Bucket="spo-dvc", Key=k)["Body"].read() for k in objects]
    for folder in (view, clone, tmp_path):
        for path in (p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, path
    assert not any(ACCESS_KEY.encode() in b or SECRET_KEY.encode() in b for b in stored)


# -- without a dvc repro: the recording's contract on a toy project, the pipeline's publish step --

TOY_DVC = """\
stages:
  make:
    foreach: ${variants}
    do:
      cmd: make ${key}
      deps:
        - src/spo/degrees.py
      params:
        - variants.${key}
      outs:
        - out/${key}
      metrics:
        - m/${key}.json:
            cache: false
  use:
    cmd: use
    deps: [out]
    outs: [final.txt]
"""


def _toy_outputs(tmp_path: Path) -> dict[str, Path]:
    run = tmp_path / "run"
    for key in ("a", "b"):
        (run / key).mkdir(parents=True)
        (run / key / "w.bin").write_bytes(key.encode() * 100)
        (run / f"{key}.json").write_text(json.dumps({"x": 1}))
    (run / "final.txt").write_text("done\n")
    return {"out/a": run / "a", "out/b": run / "b", "m/a.json": run / "a.json", "m/b.json": run / "b.json",
            "final.txt": run / "final.txt"}


def test_lock_run_on_a_toy_project_and_its_refusals(tmp_path: Path) -> None:
    params = "variants:\n  a: {loss: dpo}\n  b: {loss: ipo}\n"
    outputs = _toy_outputs(tmp_path)
    lock = yaml.safe_load(lock_run(tmp_path / "view", outputs, params, TOY_DVC))
    assert set(lock["stages"]) == {"make@a", "make@b", "use"}
    assert lock["stages"]["make@b"]["params"] == {"params.yaml": {"variants.b": {"loss": "ipo"}}}
    assert lock["stages"]["use"]["deps"][0]["path"] == "out" and lock["stages"]["use"]["deps"][0]["nfiles"] == 2
    assert not list((tmp_path / "view" / "src").rglob("__pycache__"))  # code copied without compiled files
    bundle = read_run_bundle(bundle_run(tmp_path / "view", tmp_path / "results.tar.gz"))
    assert set(bundle) == {"dvc.lock", "params.yaml", "m/a.json", "m/b.json"}  # the uncached outputs ride along
    again = bundle_run(tmp_path / "view", tmp_path / "again.tar.gz")
    assert again.read_bytes() == (tmp_path / "results.tar.gz").read_bytes()
    with pytest.raises(ValueError, match=r"missing \['final.txt'\]"):
        lock_run(tmp_path / "v2", {k: v for k, v in outputs.items() if k != "final.txt"}, params, TOY_DVC)
    with pytest.raises(ValueError, match=r"not in dvc.yaml \['typo'\]"):
        lock_run(tmp_path / "v3", {**outputs, "typo": outputs["final.txt"]}, params, TOY_DVC)
    with pytest.raises(FileExistsError):
        lock_run(tmp_path / "view", outputs, params, TOY_DVC)
    # one stage alone needs only its own outputs
    only = yaml.safe_load(lock_run(tmp_path / "v4", {"out/a": outputs["out/a"], "m/a.json": outputs["m/a.json"]},
                                   params, TOY_DVC, stages=["make@a"]))
    assert set(only["stages"]) == {"make@a"}


def test_the_publish_step_without_a_remote_hands_back_the_lock_and_pushes_nothing(tmp_path: Path) -> None:
    from spo.lineage.publish import publish

    params = "variants:\n  a: {loss: dpo}\n  b: {loss: ipo}\n"
    out = tmp_path / "artifacts"
    kwargs = dict(params_text=params, dvc_yaml=TOY_DVC, dvcignore="", run_id="r1",
                  dvc_lock=out / "dvc.lock", params_yaml=out / "params.yaml", results=out / "results.tar.gz")
    assert publish(outputs=_toy_outputs(tmp_path), remote=None, **kwargs) == {"pushed": None}
    assert set(yaml.safe_load((out / "dvc.lock").read_text())["stages"]) == {"make@a", "make@b", "use"}
    assert (out / "params.yaml").read_text() == params
    assert set(read_run_bundle(out / "results.tar.gz")) == {"dvc.lock", "params.yaml", "m/a.json", "m/b.json"}
    # a retried step starts over; with a folder remote it pushes (2 folders of 1 file, 1 file)
    # and leaves the run's files
    summary = publish(outputs=_toy_outputs(tmp_path / "again"), remote={"url": str(tmp_path / "remote")}, **kwargs)
    assert summary["pushed"] == 5 and (tmp_path / "remote" / "runs" / "r1" / "results.tar.gz").is_file()
    # compiled where no dvc.yaml was found: params.yaml only, nothing recorded
    bare = {**kwargs, "dvc_yaml": "", "dvc_lock": tmp_path / "bare" / "dvc.lock",
            "results": tmp_path / "bare" / "results.tar.gz"}
    assert publish(outputs={}, remote=None, **bare)["pushed"] is None
    assert (tmp_path / "bare" / "dvc.lock").read_text() == ""
    assert set(read_run_bundle(tmp_path / "bare" / "results.tar.gz")) == {"params.yaml"}


def test_publish_holds_each_model_once_beside_its_outputs_and_leaves_no_checkout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cluster the inputs lie in the scratch volume KFP downloaded them into, beside the
    step's outputs: the checkout and DVC's cache there hard-link them, so a model is held once."""
    from spo.lineage import dvc_sync
    from spo.lineage.publish import PUBLISH_VIEW, publish

    outputs = _toy_outputs(tmp_path)
    weights = outputs["out/a"] / "w.bin"
    seen: dict[str, object] = {}
    bundle = dvc_sync.bundle_run

    def spy(view: Path, target: Path) -> Path:
        seen.update(view=Path(view), links=weights.stat().st_nlink,
                    same=(Path(view) / "out/a/w.bin").stat().st_ino == weights.stat().st_ino)
        return bundle(view, target)

    monkeypatch.setattr(dvc_sync, "bundle_run", spy)
    out = tmp_path / "artifacts"
    publish(outputs=outputs, remote=None, params_text="variants:\n  a: {loss: dpo}\n  b: {loss: ipo}\n",
            dvc_yaml=TOY_DVC, dvcignore="", run_id="r1", dvc_lock=out / "dvc.lock", params_yaml=out / "params.yaml",
            results=out / "results.tar.gz")
    assert seen["view"] == out / PUBLISH_VIEW and seen["same"]
    assert seen["links"] == 3  # the input, the checkout's file and DVC's cache entry: one inode
    assert sorted(p.name for p in out.iterdir()) == ["dvc.lock", "params.yaml", "results.tar.gz"]
    assert weights.stat().st_nlink == 1


def test_push_refuses_credentials_in_the_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not carry credentials"):
        push_run(tmp_path, f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/prefix")


def _platform(tmp_path: Path, **dvc_remote: object) -> Path:
    data = yaml.safe_load((REPO / "configs/platform/gpu.yaml").read_text())
    data["dvc_remote"] = dvc_remote
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _compiled(tmp_path: Path, platform: Path) -> tuple[dict, dict]:
    from spo.pipelines.compile import compile_pipeline

    out = compile_pipeline(tmp_path / "p.yaml", params=REPO / "params.yaml", platform=platform)
    spec, platform_spec = [d for d in yaml.safe_load_all(out.read_text()) if d]
    return spec, platform_spec["platforms"]["kubernetes"]


def test_publish_step_gets_the_remote_and_the_keys_as_secret_refs_only(tmp_path: Path) -> None:
    platform = _platform(tmp_path, url="s3://spo-dvc/spo", endpoint_url="https://minio.example.com", name="cluster",
                         credentials_secret={"name": "spo-dvc", "access_key_id_key": "key-id",
                                             "secret_access_key_key": "secret"})
    spec, k8s = _compiled(tmp_path, platform)
    tasks = spec["root"]["dag"]["tasks"]
    publish = tasks["publish"]
    assert {"report", "judge", "configure"} <= set(publish["dependentTasks"])
    assert any(task.startswith("for-loop") for task in publish["dependentTasks"])  # the grid's train loop
    assert not publish.get("cachingOptions", {}).get("enableCache", False)  # pushes this run's outputs, always
    inputs = publish["inputs"]["parameters"]
    remote = json.loads(inputs["remote"]["runtimeValue"]["constant"])
    assert remote == {"url": "s3://spo-dvc/spo", "name": "cluster", "endpoint_url": "https://minio.example.com",
                      "region": None}
    assert "stages:" in inputs["dvc_yaml"]["runtimeValue"]["constant"]  # dvc.yaml is compiled in
    assert inputs["params_all"]["taskOutputParameter"] == {"outputParameterKey": "params_all",
                                                           "producerTask": "configure"}
    # publish's inputs are named <task>_<output> (spo.stages.table.published)
    assert set(publish["inputs"]["artifacts"]) >= {"validate_validated", "train_policy", "train_metrics",
                                                   "judge_judgments", "report_plots", "degrees_plot",
                                                   "report_report_md"}
    [secret] = k8s["deploymentSpec"]["executors"]["exec-publish"]["secretAsEnv"]
    assert secret["secretName"] == "spo-dvc" and secret["keyToEnv"] == [
        {"secretKey": "key-id", "envVar": "AWS_ACCESS_KEY_ID"},
        {"secretKey": "secret", "envVar": "AWS_SECRET_ACCESS_KEY"}]
    resources = spec["deploymentSpec"]["executors"]["exec-publish"]["container"]["resources"]
    assert "accelerator" not in resources  # the CPU pool (default_pool)
    outputs = spec["components"]["comp-publish"]["outputDefinitions"]["artifacts"]
    assert set(outputs) == {"dvc_lock", "params_yaml", "results"}


def test_platform_dvc_remote_is_checked(tmp_path: Path) -> None:
    from spo.kube.platform import load_platform

    bad = _platform(tmp_path, url=f"s3://{ACCESS_KEY}:{SECRET_KEY}@spo-dvc/spo")
    with pytest.raises(InputError, match="dvc_remote.url") as err:
        load_platform(bad)
    assert SECRET_KEY not in str(err.value)  # the message names the key, never the value
    with pytest.raises(InputError, match="dvc_remote.credentials_secret.nmae"):
        load_platform(_platform(tmp_path, url="s3://b/p", credentials_secret={"nmae": "x"}))
    defaults = load_platform(_platform(tmp_path, url="s3://b/p", credentials_secret={"name": "s"}))
    assert defaults.dvc_remote.credentials_secret.access_key_id_key == "AWS_ACCESS_KEY_ID"
    assert load_platform(REPO / "configs/platform/local.yaml").dvc_remote is None


def test_params_all_is_the_params_text_unless_the_run_changed_it() -> None:
    from spo.config import load_config
    from spo.pipelines.dag import knob_defaults
    from spo.pipelines.runtime import configure

    text = (REPO / "params.yaml").read_text()
    knobs = knob_defaults(load_config(REPO / "params.yaml"))
    assert configure(text, [], knobs)[-1] == text  # comments and all: a laptop's params.yaml stays as committed
    changed = yaml.safe_load(configure(text, ["train.beta=0.3"], {**knobs, "train_steps": 7})[-1])
    assert changed["train"]["beta"] == 0.3 and changed["train"]["optim"]["max_steps"] == 7
    assert changed["seed"] == 0 and "report" in changed and set(changed["variants"]) == {"dpo", "dpo_spo"}


def test_a_run_that_changes_the_compiled_grid_is_refused_before_any_work() -> None:
    """The train tasks are the compiled grid's cells: a run whose params or overrides make another grid
    would train cells nobody compiled (or skip some), so configure stops it, saying to compile again."""
    from spo.config import load_config
    from spo.errors import ConfigError
    from spo.pipelines.dag import knob_defaults
    from spo.pipelines.runtime import configure

    text = (REPO / "params.yaml").read_text()
    knobs = knob_defaults(load_config(REPO / "params.yaml"))
    for override, changed in (("grid.seeds=[0, 1]", "dpo_s1, dpo_spo_s1"), ("variants.dpo.set={beta: 0.5}", "dpo_s0"),
                              ("variants.dpo.loss=ipo", "dpo_s0")):
        with pytest.raises(ConfigError, match=f"grid differs .* in {changed}: .*compile again"):
            configure(text, [override], knobs, text)
    # a whole params text given at run time is held to the compiled one too
    other = text.replace("seeds: [0]", "seeds: [3]")
    with pytest.raises(ConfigError, match="dpo_s0, dpo_s3, dpo_spo_s0, dpo_spo_s3"):
        configure(other, [], knobs, text)
    assert configure(text, ["train.beta=0.3"], knobs, text)  # anything else is the run's to change
