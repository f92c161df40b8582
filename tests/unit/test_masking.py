"""masking.mask: what the CLI, the UI, XCom and relayed log lines show. Each case names its exact
input, the secret that must not survive and what must (the rest stays readable).

References independent of the provider: Airflow's own secrets masker (which names it hides) and
urllib's URL parser (where a URL's password is).
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import pytest

from airflow_provider_modeldeploy.masking import MASK, is_secret_name, mask, mask_text

# (text, secrets that must be gone, parts that must stay)
CASES = [
    ("postgresql://reg:p@ss/w?rd#x@db.example:5432/registry", ["p@ss/w?rd#x"], ["db.example:5432/registry", "reg:"]),
    ("mysql://root:" + quote("s3cr:t@/", safe="") + "@db/x", [quote("s3cr:t@/", safe="")], ["@db/x"]),
    ("https://ghp_0123456789abcdef@github.com/org/repo.git", ["ghp_0123456789abcdef"], ["github.com/org/repo.git"]),
    ("s3://bucket/m.tar?X-Amz-Credential=AKIA1%2F2&X-Amz-Signature=deadbeef&x=1", ["AKIA1", "deadbeef"], ["x=1"]),
    ("https://acct.blob.core.windows.net/c/m?sv=2022-11-02&sig=Zm9vYmFy%3D&se=2026", ["Zm9vYmFy"], ["sv=2022-11-02"]),
    ("gs://b/m?token=abc123def&alt=media", ["abc123def"], ["alt=media"]),
    ("https://maps.example/api?key=AIzaSyA-secret", ["AIzaSyA-secret"], ["maps.example/api"]),
    ("load failed: password=hunter22 user=bob", ["hunter22"], ["user=bob", "load failed"]),
    ('{"api_key": "xyz-123", "workers": 2}', ["xyz-123"], ['"workers": 2']),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", ["eyJhbGciOiJIUzI1NiJ9"], ["Authorization"]),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNz' http://h", ["dXNlcjpwYXNz"], ["http://h"]),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI AWS_REGION=eu-west-1", ["wJalrXUtnFEMI"], ["AWS_REGION=eu-west-1"]),
    ("clientSecret: s3cr3tv4lue", ["s3cr3tv4lue"], ["clientSecret"]),
    ("MLFLOW_TRACKING_PASSWORD='pa ss word'", ["pa ss word"], ["MLFLOW_TRACKING_PASSWORD"]),
]


@pytest.mark.parametrize(("text", "secrets", "kept"), CASES, ids=[c[0][:40] for c in CASES])
def test_secrets_are_masked_and_the_rest_is_kept(text: str, secrets: list[str], kept: list[str]) -> None:
    shown = mask_text(text)
    for secret in secrets:
        assert secret not in shown, shown
    for part in kept:
        assert part in shown, shown
    assert MASK in shown


@pytest.mark.parametrize(
    "text",
    [
        "models:/iris@champion",  # an MLflow alias, not userinfo
        "runs:/0a1b2c/model",
        "http://10.0.0.1:7400/services (connection refused)",
        "http://host:8080/p?email=a@b.example",  # an "@" in the query is not userinfo
        "served at http://127.0.0.1:5200/invocations",
        "tokenizer loaded; 3 workers",
        "",
    ],
)
def test_text_without_credentials_is_unchanged(text: str) -> None:
    assert mask_text(text) == text


@pytest.mark.parametrize(
    "password",
    [
        "simple",
        "with@at",
        "with/slash",
        "with?question",
        "with#hash",
        "with:colon",
        "p@:/?#[]!$&()*+,;=%",
        "p@:/?#[]!$&'()*+,;=%",
    ],
)
def test_url_passwords_of_any_characters(password: str) -> None:
    """urllib says where the password is (percent-encoded as a URL must); and raw, as people paste it,
    all that stands between the scheme and the host's "@" goes."""
    encoded = f"postgresql://svc:{quote(password, safe='')}@db.internal:5432/registry"
    assert urlsplit(encoded).password == quote(password, safe="")
    shown = mask_text(encoded)
    assert urlsplit(shown).password == MASK and urlsplit(shown).hostname == "db.internal"
    if "'" not in password:  # a quote ends a URL quoted in text or JSON: such passwords need encoding
        raw = mask_text(f"postgresql://svc:{password}@db.internal:5432/registry")
        assert password not in raw and raw.endswith("@db.internal:5432/registry")


def test_every_name_airflow_hides_is_hidden() -> None:
    """Airflow's own list of sensitive names, and its rule (substring of the normalised name)."""
    from airflow._shared.secrets_masker.secrets_masker import DEFAULT_SENSITIVE_FIELDS

    for name in DEFAULT_SENSITIVE_FIELDS:
        for spelling in (name, name.upper(), f"mlflow_{name}", f"x-{name.replace('_', '-')}"):
            assert is_secret_name(spelling), spelling
            assert mask({spelling: "v4lue-of-secret"}) == {spelling: MASK}
            assert "v4lue-of-secret" not in mask_text(f"{spelling}=v4lue-of-secret")
    for name in ("workers", "port", "model_uri", "endpoint", "max_body_mb", "dag_id"):
        assert not is_secret_name(name), name


def test_nested_values_are_walked_and_types_kept() -> None:
    record = {
        "config": {"workers": 2, "storage": {"AccessToken": "tok-1", "url": "https://u:pw1@h/x"}},
        "history": [{"message": "deploy with password=pw2"}, ("https://k:pw3@h",)],
        "port": 5200,
        "empty_token": None,
    }
    shown = mask(record)
    text = repr(shown)
    for secret in ("tok-1", "pw1", "pw2", "pw3"):
        assert secret not in text
    assert shown["config"]["workers"] == 2 and shown["port"] == 5200 and shown["empty_token"] is None
    assert isinstance(shown["history"][1], tuple)
    assert record["config"]["storage"]["AccessToken"] == "tok-1"  # the input is not modified
