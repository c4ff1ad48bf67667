"""The delivery config: parsing, ref routing and errors that name the file."""

from pathlib import Path

import pytest

from delivery.config import load_config, parse_config
from delivery.errors import ConfigError

GOOD = {
    "apps": {
        "workout-api": {
            "source_repo": "https://github.com/your-org/workout-api.git",
            "image": "127.0.0.1:5000/workout-api",
            "gitops_repo": "/tmp/gitops.git",
            "chart_path": "helm/workout-api",
            "environments": {
                "dev": {"branches": ["release-dev"], "values_file": "values-dev.yaml",
                        "application": "workout-api-dev", "namespace": "woodez-database-dev",
                        "deployment": "workout-api", "health_url": "http://127.0.0.1:18001/api/health/"},
                "prod": {"tags": ["v*.*.*"], "values_file": "values-prod.yaml",
                         "application": "workout-api-prod", "namespace": "woodez-database",
                         "deployment": "workout-api", "health_url": "http://127.0.0.1:18003/api/health/"},
            },
        }
    }
}


def test_routes_branches_and_tags_to_environments():
    """release-dev deploys to dev, a v-tag to prod, anything else nowhere."""
    app = parse_config(GOOD, Path("delivery.yaml")).app("workout-api")
    assert [e.name for e in app.environments_for_ref("refs/heads/release-dev")] == ["dev"]
    assert [e.name for e in app.environments_for_ref("refs/tags/v1.2.3")] == ["prod"]
    assert app.environments_for_ref("refs/heads/feature/x") == []
    assert app.environments_for_ref("refs/tags/latest") == []
    assert app.values_path("dev") == "helm/workout-api/values-dev.yaml"


def test_repo_matching_accepts_github_name_forms():
    """A push from org/repo finds the app whatever URL form the config uses."""
    cfg = parse_config(GOOD, Path("delivery.yaml"))
    assert [a.name for a in cfg.apps_for_repo({"your-org/workout-api"})] == ["workout-api"]
    assert [a.name for a in cfg.apps_for_repo({"git@github.com:your-org/workout-api.git"})] == ["workout-api"]
    assert cfg.apps_for_repo({"other/repo"}) == []


def test_malformed_config_names_file_and_field(tmp_path):
    """A broken config is one clear error naming the file and what is missing."""
    bad = tmp_path / "delivery.yaml"
    bad.write_text("apps:\n  x:\n    image: foo\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "source_repo" in str(e.value)
    bad.write_text("apps: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no delivery config"):
        load_config(tmp_path / "missing.yaml")


def _with(envs: dict[str, dict]) -> dict:
    """GOOD with extra keys merged into its environments (and a staging environment added)."""
    import copy

    data = copy.deepcopy(GOOD)
    app_envs = data["apps"]["workout-api"]["environments"]
    app_envs["staging"] = {**app_envs["dev"], "branches": ["main"], "values_file": "values-staging.yaml",
                           "application": "workout-api-staging"}
    for name, extra in envs.items():
        app_envs[name].update(extra)
    return data


def test_promotion_keys_are_read_per_environment():
    """promote_from, approval, soak and auto describe how an environment takes the previous one's image."""
    cfg = parse_config(_with({"staging": {"promote_from": "dev", "auto": True, "soak": "10m"},
                              "prod": {"promote_from": "staging", "approval": "required", "soak": "1h30m"}}),
                       Path("delivery.yaml"))
    app = cfg.app("workout-api")
    staging, prod, dev = app.environment("staging"), app.environment("prod"), app.environment("dev")
    assert (staging.promote_from, staging.auto, staging.soak_seconds) == ("dev", True, 600)
    assert (prod.promote_from, prod.auto, prod.soak_seconds) == ("staging", False, 5400)
    assert prod.approval_required and not staging.approval_required
    assert (dev.promote_from, dev.auto, dev.soak_seconds, dev.approval) == ("", False, 0, "none")
    assert [e.name for e in app.promotions_from("dev")] == ["staging"]
    assert [e.name for e in app.promotions_from("staging")] == ["prod"]
    # The tag route to prod is still there beside the promotion.
    assert [e.name for e in app.environments_for_ref("refs/tags/v1.2.3")] == ["prod"]


@pytest.mark.parametrize(("envs", "message"), [
    ({"staging": {"promote_from": "qa"}}, "staging.promote_from: no environment 'qa' (known: dev, prod, staging)"),
    ({"staging": {"promote_from": "staging"}}, "staging.promote_from: an environment cannot promote from itself"),
    ({"dev": {"promote_from": "prod"}, "prod": {"promote_from": "staging"}, "staging": {"promote_from": "dev"}},
     "go round in a circle"),
    ({"prod": {"promote_from": "staging", "approval": "maybe"}}, "prod.approval: expected one of required, none"),
    ({"prod": {"promote_from": "staging", "approval": True}}, "prod.approval: expected one of required, none"),
    ({"staging": {"promote_from": "dev", "soak": "10 minutes"}}, "staging.soak: expected a duration like 10m"),
    ({"staging": {"promote_from": "dev", "soak": -5}}, "staging.soak: a duration cannot be negative"),
    ({"staging": {"promote_from": "dev", "auto": "yes"}}, "staging.auto: expected true or false"),
    ({"prod": {"approval": "required", "auto": True}}, "prod: approval, auto applies to promotions; set promote_from"),
    ({"staging": {"soak": "10m"}}, "staging: soak applies to promotions; set promote_from"),
])
def test_bad_promotion_keys_are_one_clear_error(envs, message):
    """A promotion key that cannot work is refused naming the file, the environment and the key."""
    with pytest.raises(ConfigError) as e:
        parse_config(_with(envs), Path("delivery.yaml"))
    assert "delivery.yaml: apps.workout-api" in str(e.value) and message in str(e.value), str(e.value)
