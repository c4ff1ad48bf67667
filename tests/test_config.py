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
