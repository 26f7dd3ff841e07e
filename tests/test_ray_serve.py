"""Ray Serve: cluster/serve.yaml is a valid Serve config for expblip.serve.ray_serve, and deployed with
`serve run` on a local Ray it answers the same caption as the Captioner on the single-machine app's routes: /describe
(concurrent requests batched), the OpenAI-compatible /v1 API (with the real `openai` client) and /metrics."""

from __future__ import annotations

import inspect
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml
from services import BIN, Process, free_port
from test_openai_api import image_message
from test_serve import get, png_bytes, post_file
from test_serve_batching import metric_samples

from expblip.data.synthetic import synthetic_records
from expblip.infer.captioner import Captioner
from expblip.model.blip2 import GenerationConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "cluster" / "serve.yaml"
GEN = GenerationConfig(num_beams=2, max_new_tokens=6)  # what the deployment builds from beams / max_new_tokens


def test_serve_config_is_valid_and_names_the_deployments_arguments():
    from ray.serve.schema import ServeDeploySchema

    from expblip.serve.ray_serve import DEPLOYMENT, CaptionerReplica, build_app

    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "expblip.serve.ray_serve:build_app"
    accepted = set(inspect.signature(CaptionerReplica.__init__).parameters) - {"self"}
    assert set(app["args"]) - {"gpus_per_replica"} <= accepted
    deployment = app["deployments"][0]
    assert deployment["name"] == DEPLOYMENT and deployment["ray_actor_options"]["num_gpus"] == 1
    bounds = deployment["autoscaling_config"]
    assert 1 <= bounds["min_replicas"] <= bounds["max_replicas"]
    assert build_app({"model": "m", "gpus_per_replica": 1}) is not None


@pytest.mark.slow  # ~35 s a family: `serve run` starts a local Ray
@pytest.mark.parametrize("family", ["blip-2", "qwen2_5_vl"])  # the deployment takes either family, from its export
def test_serve_run_on_local_ray_answers_the_same_caption(family, request, tmp_path):
    tiny_run_dir = request.getfixturevalue("tiny_run_dir" if family == "blip-2" else "tiny_qwen_run_dir")
    assert json.loads((tiny_run_dir / "export" / "config.json").read_text())["model_type"] == family
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config.update(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app = config["applications"][0]
    app["args"].update(model=str(tiny_run_dir), device="cpu", beams=GEN.num_beams, max_new_tokens=GEN.max_new_tokens,
                       max_batch=4, max_wait_ms=200, crop_face=False, model_name="expblip-tiny")  # the synthetic faces are crops already
    deployment = app["deployments"][0]
    deployment["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 0}  # this CPU machine
    deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    proc = Process.start("serve run", [str(BIN / "serve"), "run", str(tmp_path / "serve.yaml"), "--address", "local"],
                         tmp_path / "serve.log", env=env, cwd=tmp_path, grace_s=20)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until(lambda: get(f"{url}/health")[0] == 200, 240, f"{url}/health answers")
        health = json.loads(get(f"{url}/health")[2])
        assert health["status"] == "ok" and health["batching"]["max_batch"] == 4 and health["model"] == "expblip-tiny"
        faces = [r["image"] for r in synthetic_records(4, seed=9)]
        with ThreadPoolExecutor(len(faces)) as pool:  # concurrent: the replica's queue batches them
            answers = list(pool.map(lambda face: post_file(f"{url}/describe", png_bytes(face)), faces))
        expected = Captioner.from_export(tiny_run_dir / "export").describe(faces, GEN, batch_size=1)
        assert any(e["caption"] for e in expected)  # a comparison of words, not of empty strings
        assert [status for status, _ in answers] == [200] * len(faces), answers
        assert [body["caption"] for _, body in answers] == [e["caption"] for e in expected]
        assert [[a["au"] for a in body["aus"]] for _, body in answers] == [e["aus"] for e in expected]
        status, body = post_file(f"{url}/describe", b"not an image", "notes.txt", "text/plain")
        assert status == 415 and "notes.txt" in body["error"]

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["expblip-tiny"]
        answer = client.chat.completions.create(model="expblip-tiny", messages=image_message(faces[0]))
        assert answer.choices[0].message.content == expected[0]["caption"]
        assert answer.model_extra["expblip"]["emotions"] == expected[0]["emotions"]
        samples = metric_samples(get(f"{url}/metrics")[2].decode())
        batched = sum(v for (name, _), v in samples.items() if name == "expblip_batch_size_count")
        images = sum(v for (name, _), v in samples.items() if name == "expblip_batch_size_sum")
        assert images == len(faces) + 1 and batched < images  # some requests shared a generate call
    finally:
        proc.stop()
