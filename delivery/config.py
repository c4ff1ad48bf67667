"""The delivery config: which apps exist, where their code and manifests live, and which source
refs deploy to which environment. One YAML file (`delivery.yaml`; the sandbox writes its own).

Example:

    apps:
      workout-api:
        source_repo: https://github.com/your-org/workout-api.git
        github_repository: your-org/workout-api   # for deploy feedback; default: from a GitHub source_repo
        context: .                     # build context inside the source repo
        dockerfile: Dockerfile
        image: registry.example.com/your-org/workout-api
        default_branch: main
        gitops_repo: https://github.com/your-org/workout-gitops.git
        gitops_branch: main
        chart_path: helm/workout-api
        build_args: {BASE_IMAGE: busybox:1.36}
        environments:
          dev:
            branches: [release-dev]
            values_file: values-dev.yaml          # relative to chart_path
            application: workout-api-dev          # Argo CD Application name
            argocd_namespace: argocd
            namespace: woodez-database-dev        # where the Deployment lives
            deployment: workout-api
            health_url: https://dev.example.com/api/health/
          staging:
            branches: [main]
            promote_from: dev    # promotion: the image verified in dev, never rebuilt
            auto: true           # promote on its own after each verified deploy to dev
            soak: 10m            # only a tag verified in dev at least this long, no failure since
            ...
          prod:
            tags: ["v*.*.*"]
            promote_from: staging
            approval: required   # the promote run waits for an approval in the Prefect UI
            ...
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from delivery.errors import ConfigError


@dataclass(frozen=True)
class Environment:
    name: str
    values_file: str
    application: str
    namespace: str
    deployment: str
    health_url: str
    argocd_namespace: str = "argocd"
    branches: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    # Promotion (flows/promote.py): the environment whose verified image this one takes; whether a
    # promotion waits for an approval; how long the tag must have been verified there, with no failed
    # verification since; whether a verified deploy there starts the promotion on its own.
    promote_from: str = ""
    approval: str = "none"  # required | none
    soak_seconds: float = 0.0
    auto: bool = False

    @property
    def approval_required(self) -> bool:
        return self.approval == "required"

    def matches(self, ref: str) -> bool:
        """Does a Git ref (`refs/heads/x`, `refs/tags/v1.2.3`, or a bare name) deploy here?"""
        if ref.startswith("refs/tags/"):
            name = ref.removeprefix("refs/tags/")
            return any(fnmatch.fnmatchcase(name, pat) for pat in self.tags)
        name = ref.removeprefix("refs/heads/")
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.branches)


@dataclass(frozen=True)
class App:
    name: str
    source_repo: str
    image: str
    gitops_repo: str
    chart_path: str
    environments: dict[str, Environment] = field(default_factory=dict)
    context: str = "."
    dockerfile: str = "Dockerfile"
    default_branch: str = "main"
    gitops_branch: str = "main"
    # Extra `docker build` args, e.g. BASE_IMAGE for machines without Docker Hub.
    build_args: dict[str, str] = field(default_factory=dict)
    # "owner/name" on GitHub that gets the deploy feedback (statuses, Deployments); empty: derived
    # from `source_repo` when that is a GitHub URL (see tasks/github.py).
    github_repository: str = ""

    def environment(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments)) or "none"
            raise ConfigError(f"app {self.name!r} has no environment {name!r} (known: {known})") from None

    def values_path(self, env: str) -> str:
        """Path of the environment's values file inside the GitOps repository."""
        return f"{self.chart_path.rstrip('/')}/{self.environment(env).values_file}"

    def environments_for_ref(self, ref: str) -> list[Environment]:
        return [e for e in self.environments.values() if e.matches(ref)]

    def promotions_from(self, source: str) -> list[Environment]:
        """The environments that take their image from `source` (`promote_from: <source>`)."""
        return [e for e in self.environments.values() if e.promote_from == source]


@dataclass(frozen=True)
class Config:
    path: Path
    apps: dict[str, App]

    def app(self, name: str) -> App:
        try:
            return self.apps[name]
        except KeyError:
            known = ", ".join(sorted(self.apps)) or "none"
            raise ConfigError(f"{self.path}: no app {name!r} (known: {known})") from None

    def apps_for_repo(self, repo_names: set[str]) -> list[App]:
        """Apps whose source repository is one of the given names/URLs (GitHub sends several)."""
        wanted = {_repo_key(n) for n in repo_names if n}
        return [a for a in self.apps.values() if _repo_key(a.source_repo) in wanted]


def _repo_key(url_or_name: str) -> str:
    """`https://github.com/org/x.git`, `git@github.com:org/x.git` and `org/x` all become `org/x`."""
    s = url_or_name.strip().removesuffix("/").removesuffix(".git")
    s = s.replace(":", "/")
    parts = [p for p in s.split("/") if p]
    return "/".join(parts[-2:]).lower()


_ENV_REQUIRED = ("values_file", "application", "namespace", "deployment", "health_url")
_APP_REQUIRED = ("source_repo", "image", "gitops_repo", "chart_path")
# GitHub's rules for owner and repository names, loosely: it goes into API paths, so no "/" or "..".
_GITHUB_REPO_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a list of strings")


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of strings")
    return {str(k): str(v) for k, v in value.items()}


# App and environment names go into lock names, notes, trailers and run names: one word, no separator
# those use (":" in lock names), nothing a shell, a URL or Prefect's name rules would choke on.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


_APPROVALS = ("required", "none")
_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(value: Any, where: str) -> float:
    """`10m`, `1h30m`, `90s`, `2d` or a number of seconds → seconds."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 10m, 1h or 90s, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{where}: a duration cannot be negative, got {value!r}")
        return float(value)
    text = str(value).strip()
    m = _DURATION_RE.fullmatch(text)
    if not text or not m:
        raise ConfigError(f"{where}: expected a duration like 10m, 1h or 90s, got {text!r}")
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def _promotion(env_raw: dict[str, Any], ewhere: str) -> dict[str, Any]:
    """The promotion keys of one environment, checked on their own (the source is checked later)."""
    source = env_raw.get("promote_from")
    if source is not None and (not isinstance(source, str) or not source):
        raise ConfigError(f"{ewhere}.promote_from: expected the name of another environment, got {source!r}")
    approval = env_raw.get("approval", "none")
    if approval not in _APPROVALS:
        raise ConfigError(f"{ewhere}.approval: expected one of {', '.join(_APPROVALS)}, got {approval!r}")
    auto = env_raw.get("auto", False)
    if not isinstance(auto, bool):
        raise ConfigError(f"{ewhere}.auto: expected true or false, got {auto!r}")
    soak = parse_duration(env_raw.get("soak"), f"{ewhere}.soak")
    if not source:
        # Each of these describes a promotion: without a source there is nothing to promote from.
        given = [k for k, v in (("approval", approval == "required"), ("soak", soak > 0), ("auto", auto)) if v]
        if given:
            raise ConfigError(f"{ewhere}: {', '.join(given)} applies to promotions; set promote_from "
                              "to the environment this one takes its image from")
    return {"promote_from": source or "", "approval": approval, "soak_seconds": soak, "auto": auto}


def _check_promotions(envs: dict[str, Environment], where: str) -> None:
    """Every `promote_from` names another environment of the app, and no chain comes back on itself."""
    for env in envs.values():
        if not env.promote_from:
            continue
        if env.promote_from == env.name:
            raise ConfigError(f"{where}.environments.{env.name}.promote_from: an environment cannot promote "
                              "from itself")
        if env.promote_from not in envs:
            known = ", ".join(sorted(envs))
            raise ConfigError(f"{where}.environments.{env.name}.promote_from: no environment "
                              f"{env.promote_from!r} (known: {known})")
        seen, cur = [env.name], env.promote_from
        while cur:
            if cur in seen:
                chain = " <- ".join([*seen, cur])
                raise ConfigError(f"{where}.environments.{env.name}.promote_from: the promotions go round in a "
                                  f"circle ({chain})")
            seen.append(cur)
            cur = envs[cur].promote_from


def _check_name(name: Any, where: str) -> str:
    text = str(name)
    if not _NAME_RE.fullmatch(text):
        raise ConfigError(f"{where}: name {text!r} must be 1-63 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return text


def _github_repository(value: Any, where: str) -> str:
    if value is None or value == "":
        return ""
    text = str(value).strip()
    if not _GITHUB_REPO_RE.fullmatch(text) or ".." in text:
        raise ConfigError(f"{where}: expected \"owner/name\" of a GitHub repository, got {text!r}")
    return text


def parse_config(data: Any, path: Path) -> Config:
    if not isinstance(data, dict) or not isinstance(data.get("apps"), dict):
        raise ConfigError(f"{path}: expected a mapping with an 'apps' mapping at the top")
    apps: dict[str, App] = {}
    for app_name, raw in data["apps"].items():
        where = f"{path}: apps.{app_name}"
        _check_name(app_name, where)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping")
        missing = [k for k in _APP_REQUIRED if not raw.get(k)]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        envs: dict[str, Environment] = {}
        for env_name, env_raw in (raw.get("environments") or {}).items():
            ewhere = f"{where}.environments.{env_name}"
            _check_name(env_name, ewhere)
            if not isinstance(env_raw, dict):
                raise ConfigError(f"{ewhere}: expected a mapping")
            emissing = [k for k in _ENV_REQUIRED if not env_raw.get(k)]
            if emissing:
                raise ConfigError(f"{ewhere}: missing {', '.join(emissing)}")
            envs[str(env_name)] = Environment(
                name=str(env_name),
                values_file=str(env_raw["values_file"]),
                application=str(env_raw["application"]),
                namespace=str(env_raw["namespace"]),
                deployment=str(env_raw["deployment"]),
                health_url=str(env_raw["health_url"]),
                argocd_namespace=str(env_raw.get("argocd_namespace", "argocd")),
                branches=_str_list(env_raw.get("branches"), f"{ewhere}.branches"),
                tags=_str_list(env_raw.get("tags"), f"{ewhere}.tags"),
                **_promotion(env_raw, ewhere),
            )
        if not envs:
            raise ConfigError(f"{where}: no environments")
        _check_promotions(envs, where)
        apps[str(app_name)] = App(
            name=str(app_name),
            source_repo=str(raw["source_repo"]),
            image=str(raw["image"]),
            gitops_repo=str(raw["gitops_repo"]),
            chart_path=str(raw["chart_path"]),
            environments=envs,
            context=str(raw.get("context", ".")),
            dockerfile=str(raw.get("dockerfile", "Dockerfile")),
            default_branch=str(raw.get("default_branch", "main")),
            gitops_branch=str(raw.get("gitops_branch", "main")),
            build_args=_str_map(raw.get("build_args"), f"{where}.build_args"),
            github_repository=_github_repository(raw.get("github_repository"), f"{where}.github_repository"),
        )
    return Config(path=path, apps=apps)


def load_config(path: Path | None = None) -> Config:
    """Read the config in force (see `Settings.resolved_config_file`); errors name the file."""
    if path is None:
        from delivery.settings import get_settings

        path = get_settings().resolved_config_file()
    if not path.exists():
        raise ConfigError(
            f"{path}: no delivery config. Start the sandbox (`delivery sandbox up`) or set DELIVERY_CONFIG_FILE."
        )
    try:
        data = YAML(typ="safe").load(path.read_text())
    except YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_config(data, path)
