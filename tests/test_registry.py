"""The sampler registry is the one source of sampler knowledge: a sampler registered there ALONE (a copy of Euler
under another name) is offered by the CLI, written in the infotext, run by the graph runner, parsed in parity's
``<sampler>_cfg<scale>`` groups, listed and accepted by the server, read by batch jobs and the README table; and
the specs' fields (noise, eta, aliases) give what the code used to decide by name."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tritonsd.sampler import registry
from tritonsd.sampler import samplers as K
from tritonsd.sampler import schedule as S

COPY = "euler_copy"


@pytest.fixture
def euler_copy():
    """Euler registered again as ``euler_copy`` ("Euler Copy", A1111 alias ``k_euler_copy``, reference spelling
    ``eulercopy``), removed afterwards."""
    spec = registry.register(dataclasses.replace(registry.get("euler"), name=COPY, a1111_name="Euler Copy",
                                                 a1111_aliases=("k_euler_copy",), reference_names=("eulercopy",)))
    try:
        yield spec
    finally:
        del registry.SAMPLERS[COPY]


@pytest.fixture
def ancestral_copy():
    """Euler a registered again as ``euler_a_copy`` (ancestral: draws noise), removed afterwards."""
    spec = registry.register(dataclasses.replace(registry.get("euler_a"), name="euler_a_copy",
                                                 a1111_name="Euler a Copy", a1111_aliases=(), reference_names=()))
    try:
        yield spec
    finally:
        del registry.SAMPLERS[spec.name]


# ---------------------------------------------------------------- the table itself


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(dataclasses.replace(registry.get("euler"), a1111_name="Other"))
    assert registry.get("euler").a1111_name == "Euler"


def test_noise_and_eta_come_from_the_specs():
    sigmas = S.get_sigmas_karras(5, 0.03, 14.6)  # 5 steps, the last to sigma 0
    draws = {name: spec.noise_draws(sigmas) for name, spec in registry.SAMPLERS.items()
             if spec.space == "sigmas"}
    assert draws == {"dpmpp_2m": 0, "euler": 0, "euler_a": 4}
    assert registry.get("euler_a").noise_draws(sigmas, eta=0.0) == 0
    assert {n for n, s in registry.SAMPLERS.items() if s.takes_noise} == {"euler_a", "ddim"}
    assert {n for n, s in registry.SAMPLERS.items() if s.takes_eta} == {"ddim"}
    assert set(registry.graph_samplers()) == {"dpmpp_2m", "euler", "euler_a"}


def test_the_ancestral_count_is_what_the_sampler_draws():
    sigmas = S.get_sigmas_karras(6, 0.03, 14.6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def noise(a, b):
        calls.append(b)
        return torch.zeros_like(x)

    K.sample_euler_ancestral(lambda x, s, **_: x * 0.5, x, sigmas, noise_sampler=noise)
    assert registry.get("euler_a").noise_draws(sigmas) == len(calls) == 5


def test_a1111_aliases_any_case():
    assert registry.from_a1111_alias(" K_Euler_A ") == "Euler a"
    assert registry.from_a1111_alias("k_euler_ancestral") == "Euler a"
    assert registry.from_a1111_alias("DDIM") == "DDIM"
    assert registry.from_a1111_alias("Euler a") is None  # a name, not an alias


def test_eta_message_names_the_samplers_from_the_registry():
    from tritonsd.sampler.settings import GenerationSettings, SettingsError

    with pytest.raises(SettingsError, match=r"applies to ddim only \(euler needs 0; euler_a always uses"):
        GenerationSettings(sampler="euler", eta=0.5, seed=1).check()
    assert GenerationSettings(sampler="ddim", eta=0.5, seed=1).check().eta == 0.5


# ---------------------------------------------------------------- a new sampler, registered alone, everywhere


def generate_action(parser):
    """The ``--sampler`` action of ``tritonsd generate``."""
    sub = next(a for a in parser._actions if a.dest == "command")
    return next(a for a in sub.choices["generate"]._actions if a.dest == "sampler")


def test_cli_offers_it(euler_copy):
    from tritonsd.tools.cli import build_parser

    parser = build_parser()
    assert COPY in generate_action(parser).help
    args = parser.parse_args(["generate", "--checkpoint", "demo:sd1", "--prompt", "x", "--sampler", COPY])
    assert args.sampler == COPY


def test_cli_names_are_the_registry_names(tmp_path, capsys):
    """--sampler takes ours and AUTOMATIC1111's names (the settings check them): its help lists the registry's,
    and a name the registry does not have is bad usage (exit 2) before any model loads."""
    from tritonsd.tools.cli import build_parser, main

    help_text = generate_action(build_parser()).help
    for spec in registry.SAMPLERS.values():
        assert spec.name in help_text and spec.a1111_name in help_text
    assert main(["generate", "--checkpoint", "demo:sd1", "--prompt", "x", "--sampler", COPY, "--device", "cpu",
                 "--out", str(tmp_path)]) == 2
    assert f"--sampler '{COPY}' is unknown" in capsys.readouterr().err


def test_generate_writes_its_name_and_runs_its_function(euler_copy, tmp_path, capsys):
    """``tritonsd generate --sampler euler_copy`` on the demo model: A1111's name in the PNG's infotext, and the
    pixels of ``--sampler euler`` (the copy runs Euler's function over Euler's schedule)."""
    from tritonsd.tools.cli import main

    common = ["generate", "--checkpoint", "demo:sd1", "--prompt", "a red fox", "--width", "64", "--height", "64",
              "--steps", "2", "--seed", "5", "--quiet"]
    assert main([*common, "--sampler", COPY, "--out", str(tmp_path / "copy")]) == 0
    assert main([*common, "--sampler", "euler", "--out", str(tmp_path / "euler")]) == 0
    capsys.readouterr()
    (copy,), (euler,) = (list((tmp_path / d).glob("*.png")) for d in ("copy", "euler"))
    with Image.open(copy) as a, Image.open(euler) as b:
        text, want = a.info["parameters"], b.info["parameters"]
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert "Sampler: Euler Copy" in text and "Sampler: Euler," in want
    assert text.replace("Euler Copy", "Euler") == want


def test_pipeline_infotext(euler_copy):
    import tritonsd

    pipe = tritonsd.load("demo:sd1", device="cpu")
    images = pipe("a red fox", sampler=COPY, steps=1, width=64, height=64, seed=3, karras=True)
    text = images[0].info["parameters"]
    assert "Sampler: Euler Copy" in text and "Schedule type: Karras" in text


class ToyDenoiser:
    """A cheap sigma-space denoiser: depends on x, sigma and the context."""

    def __call__(self, x, sigma, context):
        return x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5 + context.mean(dim=(1, 2))[:, None, None, None]


def toy_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 1, 77, 8, generator=g)
    return x, cond, uncond, S.get_sigmas_karras(3, 0.03, 14.6)


def test_graph_runner_serves_it(euler_copy):
    from tritonsd.sampler import denoise as D
    from tritonsd.sampler.graph import GraphRunner

    assert COPY in GraphRunner.serves()
    x, cond, uncond, sigmas = toy_inputs()
    runner = GraphRunner(ToyDenoiser())
    by_spec = runner.run(x, cond, uncond, sigmas=sigmas, cfg_scale=7.5, sampler=euler_copy)
    by_name = runner.run(x, cond, uncond, sigmas=sigmas, cfg_scale=7.5, sampler=COPY)
    ((key, entry),) = runner.entries.items()
    assert key.sampler == COPY and entry.spec is euler_copy and key.noise_draws == 0 and runner.captures == 1
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}}
    direct = K.sample_euler(D.CFGDenoiser(ToyDenoiser(), 7.5), x, sigmas, extra_args=extra)
    assert torch.equal(by_spec, direct) and torch.equal(by_name, direct)


def test_graph_runner_takes_noise_as_the_spec_says(ancestral_copy):
    from tritonsd.sampler.graph import GraphRunner, GraphRunnerError, noise_draws, predraw_noise

    x, cond, uncond, sigmas = toy_inputs()
    runner = GraphRunner(ToyDenoiser())
    with pytest.raises(GraphRunnerError, match="euler_a_copy needs pre-drawn noise"):
        runner.run(x, cond, uncond, sigmas=sigmas, cfg_scale=7.5, sampler=ancestral_copy)
    n = noise_draws(ancestral_copy, sigmas)
    assert n == noise_draws("euler_a", sigmas) == 2
    noise = predraw_noise(x.shape, n, 9)
    copy = runner.run(x, cond, uncond, noise, sigmas=sigmas, cfg_scale=7.5, sampler=ancestral_copy)
    assert torch.equal(copy, runner.run(x, cond, uncond, noise, sigmas=sigmas, cfg_scale=7.5, sampler="euler_a"))


def test_graph_runner_refuses_what_is_not_graphable(euler_copy, monkeypatch):
    from tritonsd.sampler.graph import GraphRunner, GraphRunnerError

    monkeypatch.setitem(registry.SAMPLERS, COPY, dataclasses.replace(euler_copy, graphable=False))
    assert COPY not in GraphRunner.serves()
    x, cond, uncond, sigmas = toy_inputs()
    with pytest.raises(GraphRunnerError, match=f"not '{COPY}'"):
        GraphRunner(ToyDenoiser()).run(x, cond, uncond, sigmas=sigmas, cfg_scale=7.5, sampler=COPY)


def test_parity_groups_parse_it(euler_copy):
    from tritonsd.testing.groups import SamplerGroup, parse_sampler_group

    assert parse_sampler_group(f"{COPY}_cfg7p5") == SamplerGroup(COPY, False, 7.5)
    assert parse_sampler_group("eulercopy_karras_cfg1") == SamplerGroup(COPY, True, 1.0)  # a reference spelling
    assert parse_sampler_group("k_euler_a_cfg3") == SamplerGroup("euler_a", False, 3.0)
    assert parse_sampler_group("heun_cfg3") is None


def test_parity_groups_do_not_know_it_unregistered():
    from tritonsd.testing.groups import parse_sampler_group

    assert parse_sampler_group(f"{COPY}_cfg7p5") is None


def asgi_get(app, path: str):
    """(status, JSON body) of a GET through the ASGI app, in-process (no HTTP client needed)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_server_lists_and_accepts_it(euler_copy):
    from tritonsd.serve.app import ServerState, create_app
    from tritonsd.serve.jobs import _sampler

    app = create_app(ServerState(catalog=None, host=None, worker=None))  # the samplers route needs none of them
    status, listed = asgi_get(app, "/sdapi/v1/samplers")
    assert status == 200
    assert {"name": "Euler Copy", "aliases": ["k_euler_copy"], "options": {}} in listed
    assert {"name": "Euler a", "aliases": ["k_euler_a", "k_euler_ancestral"], "options": {}} in listed
    assert [s["name"] for s in listed] == [s.a1111_name for s in registry.SAMPLERS.values()]
    assert _sampler("Euler Copy", "Karras") == (COPY, True)
    assert _sampler(" K_EULER_COPY ", None) == (COPY, None)
    assert _sampler("Euler Copy Karras", None) == (COPY, True)


def test_batch_and_readme_table_read_it(euler_copy):
    from benchmarks import readme_table
    from tritonsd.batch.jobs import parse_sampler

    assert parse_sampler({"sampler_name": "Euler Copy", "scheduler": "Uniform"}) == (COPY, False)
    assert parse_sampler({"scheduler": "Karras"}) == (registry.DEFAULT_SAMPLER, True)
    assert readme_table.sampler_caption(COPY) == "Euler Copy"
    assert readme_table.sampler_caption("dpmpp_2m") == "DPM++ 2M Karras"
    assert readme_table.sampler_caption("heun") == "heun"
