"""What cluster/README.md says about submitting to a Ray 2.60 head, checked against the
installed Ray: the jobs client sends the token only under RAY_AUTH_MODE=token, the
runtime-env options exclude each other, and the local-try runtime-env recipe works."""
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "cluster" / "README.md").read_text()
HEADERS = """
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
print(sorted(k.lower() for k in get_auth_headers_if_auth_enabled({})))
"""


def _client_headers(auth_mode: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_TOKEN"] = "0123456789abcdef0123456789abcdef"  # a dummy token the client could send
    if auth_mode:
        env["RAY_AUTH_MODE"] = auth_mode
    return subprocess.run([sys.executable, "-c", HEADERS], capture_output=True, text=True, env=env,
                          timeout=120, check=True).stdout.strip()


def test_jobs_client_sends_the_token_only_under_ray_auth_mode_token():
    assert _client_headers(None) == "[]"  # -> "Missing authentication token" on a token head
    assert _client_headers("token") == "['authorization']"
    assert "export RAY_ADDRESS=http://127.0.0.1:8265\nexport RAY_AUTH_MODE=token" in README
    assert "Missing authentication token" in README


def test_runtime_env_file_and_json_cannot_be_combined():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    try:
        parse_runtime_env_args(runtime_env="cluster/runtime_env.yaml", runtime_env_json="{}")
    except ValueError as err:
        assert "Only one of --runtime_env and --runtime-env-json" in str(err)
        assert "Only one of --runtime_env and --runtime-env-json can be provided" in README
    else:
        raise AssertionError("Ray accepted --runtime-env with --runtime-env-json")
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for command in block.replace("\\\n", " ").split("\n"):
            assert not ("--runtime-env " in command and "--runtime-env-json" in command), command


def test_local_try_runtime_env_recipe_adds_credentials_to_env_vars():
    """The README's heredoc appended to cluster/runtime_env.yaml is a valid runtime env
    whose env_vars hold the credentials (and the repository file holds none)."""
    appended = re.search(r"<<'YAML'\n(.*?)YAML\n", README, re.S).group(1)
    base = (ROOT / "cluster" / "runtime_env.yaml").read_text()
    env = yaml.safe_load(base + appended)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env["env_vars"])
    assert set(env) == set(yaml.safe_load(base))
    assert not any(k.startswith(("AWS_ACCESS", "AWS_SECRET", "RAY_AUTH")) for k in yaml.safe_load(base)["env_vars"])
