"""S3 keys never travel inside what ncd hands to Ray (which pickles it into run state)."""
import pickle

from ncd.config import S3Config, load_config, public_dict, redacted
from ray_jobs.session import credential_env, run_storage

SECRET = "sentinel-SECRET-unit"


def test_run_storage_filesystem_pickles_without_keys():
    s3 = S3Config(endpoint_override="127.0.0.1:9", scheme="http", access_key="AKIAUNIT", secret_key=SECRET)
    fs, path = run_storage("s3://bucket/runs/tune", s3)
    assert path == "bucket/runs/tune"
    state = pickle.dumps(fs)  # what Tune writes to tuner.pkl in the bucket
    assert SECRET.encode() not in state and b"AKIAUNIT" not in state and b"127.0.0.1:9" in state
    assert run_storage("/local/runs", s3) == (None, "/local/runs")


def test_redacted_configs_hold_no_keys_and_the_runtime_env_does():
    cfg = load_config(None, ["s3.access_key=AKIAUNIT", f"s3.secret_key={SECRET}", "s3.endpoint_override=h:1"])
    assert redacted(cfg).s3.endpoint_override == "h:1" and SECRET not in repr(public_dict(cfg))
    assert cfg.s3.secret_key == SECRET  # the driver keeps them
    assert credential_env(cfg.s3) == {"AWS_ACCESS_KEY_ID": "AKIAUNIT", "AWS_SECRET_ACCESS_KEY": SECRET}
    assert credential_env(redacted(cfg).s3) == {}
