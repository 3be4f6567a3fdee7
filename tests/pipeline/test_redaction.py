"""pipeline.redaction: credentials out of every text the pipeline logs or prints.

What reaches MLflow end to end: ``tests/reliability/test_security.py``.
"""

from __future__ import annotations

from pipeline import redaction


def test_redact_masks_uri_credentials_and_secret_environment_values(monkeypatch):
    monkeypatch.setenv("DB_PASSWORD", "correct-horse-battery")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # under 8 characters: not worth masking
    text = "http://u:p@h:5000 s3://KEY:SECRET@b/p sqlite:///a/b@c.db password=correct-horse-battery"
    assert redaction.redact(text) == ("http://***@h:5000 s3://***@b/p sqlite:///a/b@c.db "
                                      "password=***DB_PASSWORD***")
    assert redaction.redact("token abc") == "token abc"


def test_redact_survives_a_variable_deleted_by_another_thread(monkeypatch) -> None:
    """MLflow's telemetry thread deletes its session variable while the stage logs its
    parameters; a name listed but gone by the time it is read is skipped, not a KeyError."""
    from collections.abc import MutableMapping

    class Vanishing(MutableMapping):
        def __init__(self, data: dict[str, str]) -> None:
            self.data = data

        def __getitem__(self, name: str) -> str:
            return self.data[name]

        def __iter__(self):
            return iter([*self.data, "_MLFLOW_TELEMETRY_SESSION_ID"])  # listed, then gone

        def __len__(self) -> int:
            return len(self.data) + 1

        def __setitem__(self, name: str, value: str) -> None:  # pytest sets its own variables
            self.data[name] = value

        def __delitem__(self, name: str) -> None:
            del self.data[name]

    monkeypatch.setattr(redaction.os, "environ", Vanishing({"DB_PASSWORD": "hunter2-hunter2"}))
    assert redaction.redact("uri with hunter2-hunter2") == "uri with ***DB_PASSWORD***"
