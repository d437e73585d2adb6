"""The one redaction rule: what it masks (secret keys, URI user-info, secret query parameters) and what
it leaves alone, and that the command line prints nothing it masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from knet_platform.cli import main
from knet_platform.redaction import MASK, is_secret_key, redact, redact_text

REPO = Path(__file__).absolute().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("https://alice:hunter2@mlflow.example.com", "https://***@mlflow.example.com"),
        ("postgresql+psycopg2://mlflow:p@ss@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
        ("https://host/?token=abc", "https://host/?token=***"),
        ("https://host/x?a=1&access_key=K&password=P#top", "https://host/x?a=1&access_key=***&password=***#top"),
        ("s3://b/k?X-Amz-Signature=s1&X-Amz-Credential=c1&v=2", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***&v=2"),
        ("https://acct.blob.core.windows.net/c?sv=2024&sig=Zm9v", "https://acct.blob.core.windows.net/c?sv=2024&sig=***"),
        ("run with tracking.uri=http://u:p@h:5000 now", "run with tracking.uri=http://***@h:5000 now"),
    ],
)  # fmt: skip
def test_uri_secrets_are_masked(text: str, masked: str) -> None:
    assert redact_text(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////home/me/.knet/mlflow.db",
        "s3://bucket/models/v1@2024/weights.pt",  # an "@" in a path is no user-info
        "https://host/api?project=seg&keyword=cat",
        "file:///data/coco/train2017",
        "val/pq=41.2 mode=max",
    ],
)
def test_text_without_secrets_is_unchanged(text: str) -> None:
    assert redact_text(text) == text


def test_secret_keys_are_masked_whole_and_nested_strings_are_scanned() -> None:
    assert all(map(is_secret_key, ["password", "API_KEY", "aws_secret_access_key", "auth-token", "sig"]))
    assert not any(map(is_secret_key, ["num_proposals", "masks", "storage_path", "keyword"]))
    value = {
        "tracking": {"uri": "http://u:p@h", "password": "p", "api_key": None},
        "hosts": ["https://a:b@one", ("https://two/?token=t",)],
        "epochs": 12,
    }
    assert redact(value) == {
        "tracking": {"uri": f"http://{MASK}@h", "password": MASK, "api_key": None},
        "hosts": [f"https://{MASK}@one", (f"https://two/?token={MASK}",)],
        "epochs": 12,
    }
    assert value["tracking"]["password"] == "p"  # a copy: the original keeps what resuming needs


def test_show_config_masks_secrets_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = "https://alice:hunter2@mlflow.example.com/?token=abc123"
    assert main(["show-config", str(QUICKSTART), "--set", f"tracking.uri={uri}"]) == 0
    printed = capsys.readouterr().out
    assert "hunter2" not in printed and "abc123" not in printed
    assert "# secrets are masked" in printed
    assert yaml.safe_load(printed)["tracking"]["uri"] == "https://***@mlflow.example.com/?token=***"


def test_an_error_line_never_prints_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    bad = "tracking.uri={https://alice:hunter2@host: 1}"  # a mapping where a string belongs
    assert main(["show-config", str(QUICKSTART), "--set", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tracking.uri: must be a string") and "hunter2" not in err
