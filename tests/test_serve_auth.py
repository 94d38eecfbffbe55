"""``--api-auth``: every route, the page included, needs the credentials; webuiapi's ``username`` / ``password``
work; a wrong password or none gets A1111's 401 JSON."""

from __future__ import annotations

import pytest

try:
    import requests
    import webuiapi
except ModuleNotFoundError as e:
    pytest.fail(f"{e.name} is not installed: pip install -e '.[test]'", pytrace=False)

from _serve_server import Server  # noqa: E402

pytestmark = pytest.mark.slow  # a server process started for the module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(["--checkpoint", "demo:sd1", "--api-auth", "alice:s3cret,bob:hunter2"],
               tmp_path_factory.mktemp("serve-auth") / "server.log")
    yield s
    s.stop()


@pytest.mark.parametrize("auth", [None, ("alice", "wrong"), ("mallory", "s3cret")])
@pytest.mark.parametrize("path", ["/", "/sdapi/v1/progress", "/sdapi/v1/sd-models"])
def test_without_the_right_credentials_401(server, auth, path):
    r = requests.get(server.url + path, auth=auth, timeout=30)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert r.json()["detail"] == "Incorrect username or password"


def test_webuiapi_with_credentials(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="bob", password="hunter2")
    r = api.txt2img(prompt="behind a password", seed=2, width=64, height=64, steps=2)
    assert len(r.images) == 1 and r.info["all_seeds"] == [2]
    assert requests.get(server.url + "/", auth=("alice", "s3cret"), timeout=30).status_code == 200
