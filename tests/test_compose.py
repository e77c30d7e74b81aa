"""The deployment files agree with the project: docker-compose.yml (and its "ha" profile with docker-compose.ha.yml),
Dockerfile, .dockerignore and .env.example.

Read as files (no Docker engine needed): every service runs a documented command, the workers cover both queues,
every ORCHESTRATOR_* variable is a real setting with the settings' own default, and Valkey, Flower and the
healthchecks are configured as the contract requires. When the docker client has the compose plugin,
`docker compose config` must accept the file too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import redis
import yaml

from orchestrator.settings import ENV_PREFIX, Settings
from orchestrator.testing.cluster import Proc, find_valkey, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
HA_FILE = ROOT / "docker-compose.ha.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("agents", "ops", "beat", "flower")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_SERVICES = ("valkey-replica", *SENTINELS)  # the "ha" profile; `valkey` is its first primary
QUEUES = {"agents", "ops"}  # the fleet's two queues (CONTRACT section 1 and orchestrator/celery.py)
CELERY = ["celery", "-A", "orchestrator"]
# A `${NAME}`, `${NAME:-default}`, `${NAME:?message}` (and `-`/`?` forms) reference in the compose file.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# `NAME=value` or, commented out at its default, `# NAME=value`.
ENV_LINE = re.compile(r"^(#\s?)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


SETTING_VARS = {env_name(field) for field in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    """Every variable .env.example names (set or commented out) and its value."""
    found: dict[str, str] = {}
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = ENV_LINE.match(line)
        if not m:
            continue
        name = m.group(2)
        assert name not in found, f".env.example names {name} twice"
        before = lines[i - 1] if i else ""
        assert before.startswith("# ") and not ENV_LINE.match(before), f"{name} needs a one-line comment above it"
        found[name] = m.group(3)
    return found


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ORCHESTRATOR_* variable from the test run's own environment."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def option(args: list[str], *names: str) -> str | None:
    """The value of a command-line option given as `-X value`, `--name value` or `--name=value`."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Mount path -> named volume, for the short `name:/path` syntax this file uses."""
    targets = {}
    for volume in service.get("volumes") or []:
        parts = str(volume).split(":")
        source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])  # "" = anonymous volume
        targets[target] = source
    return targets


def workers(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {name: argv(s) for name, s in services.items() if argv(s)[:4] == [*CELERY, "worker"]}


def interpolations(path: Path = COMPOSE_FILE) -> list[tuple[str, str | None, str | None]]:
    """(name, operator, default-or-message) of every ${...} in a compose file."""
    return [(m.group(1), m.group(2), m.group(3)) for m in INTERPOLATION.finditer(path.read_text())]


def interpolate(text: str, **values: str) -> str:
    """What compose makes of ``text``: ${NAME...} from ``values`` (else its default), and ``$$`` as ``$``."""
    def one(m: re.Match[str]) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in values:
            return values[name]
        assert op and "-" in op, f"${{{name}}} has no default and no value was given"
        return rest or ""
    return INTERPOLATION.sub(one, text).replace("$$", "$")


def settings_from(values: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


# --- services and commands --------------------------------------------------------------------------------------


def test_the_fleet_services_are_there(services: dict[str, dict[str, Any]]) -> None:
    always = {name for name, service in services.items() if not service.get("profiles")}
    assert always == {"valkey", *APP_SERVICES}  # the default `docker compose up`: one Valkey, as before
    assert {name for name in services if name not in always} == set(HA_SERVICES)
    for name in HA_SERVICES:
        assert services[name]["profiles"] == ["ha"], name


def test_every_command_is_a_documented_one(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        args = argv(service)
        if name in ("valkey", *HA_SERVICES):
            assert args[0] == "valkey-server" or args[-1].rstrip().endswith('--sentinel'), name
            assert str(service["image"]).startswith("valkey/valkey:")
            continue
        assert args[:3] == CELERY, f"{name}: {args}"
        assert args[3] in {"worker", "beat", "flower"}, f"{name}: {args}"
    assert argv(services["beat"])[3] == "beat"
    assert argv(services["flower"])[3] == "flower"
    assert option(argv(services["flower"]), "--port") == "5555"


def test_app_services_build_the_image_and_wait_for_valkey(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        service = services[name]
        build = service["build"]
        assert (build if isinstance(build, str) else build.get("context", ".")) == ".", name
        assert service["depends_on"]["valkey"]["condition"] == "service_healthy", name
        assert {"path": ".env", "required": False} in service["env_file"], name
        assert service.get("init") is True, f"{name}: needs an init to forward signals and reap agents' orphans"


def test_worker_queues_cover_agents_and_ops(services: dict[str, dict[str, Any]]) -> None:
    found = workers(services)
    assert set(found) == {"agents", "ops"}
    covered: set[str] = set()
    names = set()
    for name, args in found.items():
        queues = set((option(args, "-Q", "--queues") or "").split(","))
        assert queues and queues <= QUEUES, f"{name} consumes {queues}"
        covered |= queues
        node = option(args, "-n", "--hostname")
        assert node and node.endswith("@%h"), f"{name}: node name {node}"
        names.add(node)
    assert covered == QUEUES
    assert len(names) == len(found), "each worker needs its own node name"
    agents = found["agents"]
    assert option(agents, "-Q", "--queues") == "agents"
    assert option(agents, "-P", "--pool") == "threads"
    assert option(agents, "--concurrency", "-c") == "${AGENTS_CONCURRENCY:-10}"
    assert option(found["ops"], "--concurrency", "-c") == "2"


def test_no_compose_only_variable_looks_like_a_setting() -> None:
    """A compose-only knob named ORCHESTRATOR_* would be mistaken for (or collide with) a fleet setting."""
    for name, _, _ in interpolations() + interpolations(HA_FILE):
        if name.startswith(ENV_PREFIX):
            assert name in SETTING_VARS, f"{name} is not a setting of orchestrator.settings.Settings"


# --- settings ------------------------------------------------------------------------------------------------


def test_every_orchestrator_variable_in_compose_is_a_setting(compose: dict[str, Any]) -> None:
    passed: set[str] = set()
    for service in [*compose["services"].values(), compose.get("x-fleet-app", {})]:
        passed |= {name for name in environment(service) if name.startswith(ENV_PREFIX)}
    passed |= {name for name in compose["x-fleet-env"] if name.startswith(ENV_PREFIX)}
    passed |= {name for name, _, _ in interpolations() if name.startswith(ENV_PREFIX)}
    assert passed, "the compose file passes no settings"
    assert passed <= SETTING_VARS, f"not settings: {sorted(passed - SETTING_VARS)}"


def test_every_app_service_gets_the_fleet_environment(compose: dict[str, Any]) -> None:
    fleet_env = compose["x-fleet-env"]
    assert fleet_env["ORCHESTRATOR_BROKER_URL"] == "redis://:${VALKEY_PASSWORD}@valkey:6379/0"
    assert fleet_env["ORCHESTRATOR_RESULT_BACKEND"] == "redis://:${VALKEY_PASSWORD}@valkey:6379/1"
    assert fleet_env["ANTHROPIC_API_KEY"] == "${ANTHROPIC_API_KEY:-}"
    # An empty ANTHROPIC_BASE_URL would replace the SDK's default endpoint with "": pass it only when set.
    assert fleet_env["ANTHROPIC_BASE_URL"] is None
    for name in APP_SERVICES:
        env = environment(compose["services"][name])
        assert {k: env.get(k) for k in fleet_env} == fleet_env, name


def test_compose_settings_are_valid_and_defaults_are_the_settings_own(
    compose: dict[str, Any], clean_env: pytest.MonkeyPatch
) -> None:
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    fixed = {k: v.replace("${VALKEY_PASSWORD}", "secret") for k, v in compose["x-fleet-env"].items()
             if k.startswith(ENV_PREFIX) and "${" not in v.replace("${VALKEY_PASSWORD}", "")}
    with_defaults = {name: value for name, op, value in interpolations() if name.startswith(ENV_PREFIX)}
    assert {op for name, op, _ in interpolations() if name.startswith(ENV_PREFIX)} == {":-"}
    deployed = settings_from({**fixed, **with_defaults}, clean_env)
    for name in with_defaults:
        field = name[len(ENV_PREFIX):].lower()
        assert getattr(deployed, field) == getattr(defaults, field), f"{name}: compose default differs"
    assert deployed.broker_url == "redis://:secret@valkey:6379/0"
    assert deployed.result_backend_url == "redis://:secret@valkey:6379/1"
    assert str(deployed.workspace_dir) == "/var/lib/orchestrator/workspace"
    budget = {"daily_token_limit", "agent_token_limit", "max_concurrent_agents", "max_task_duration_minutes",
              "budget_enforcement", "budget_warning_percent", "timezone"}
    assert {env_name(f) for f in budget} <= set(with_defaults), "budget settings pass through with defaults"


def test_env_example_names_exactly_the_settings(env_example: dict[str, str]) -> None:
    named = {name for name in env_example if name.startswith(ENV_PREFIX)}
    assert named - SETTING_VARS == set(), "not settings"
    assert SETTING_VARS - named == set(), "settings missing from .env.example"
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "FLOWER_BASIC_AUTH", "VALKEY_PASSWORD",
                 "AGENTS_CONCURRENCY"):
        assert name in env_example, name


def test_env_example_defaults_are_the_settings_own(env_example: dict[str, str], clean_env: pytest.MonkeyPatch) -> None:
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    values = {}
    for field, info in Settings.model_fields.items():
        value = env_example[env_name(field)]
        if info.default is None:
            assert value == "", f"{env_name(field)}: unset by default, and an empty value is not unset"
        elif field == "workspace_dir":
            assert value.startswith("/") and value.endswith("/.orchestrator/workspace")  # ~ is the user's home
        else:
            values[env_name(field)] = value
    example = settings_from(values, clean_env)
    for name in values:
        field = name[len(ENV_PREFIX):].lower()
        assert getattr(example, field) == getattr(defaults, field), f"{name}={values[name]} is not the default"


def test_every_compose_variable_is_in_env_example(env_example: dict[str, str]) -> None:
    for name, _, _ in interpolations() + interpolations(HA_FILE):
        assert name in env_example, f"{name} is used by a compose file but missing from .env.example"
    # The switch to the HA setup is two documented lines, commented out: the default stays one Valkey.
    assert env_example["COMPOSE_PROFILES"] == "ha"
    assert env_example["COMPOSE_FILE"].split(":") == [COMPOSE_FILE.name, HA_FILE.name]
    lines = ENV_EXAMPLE.read_text().splitlines()
    assert {"# COMPOSE_PROFILES=ha", f"# COMPOSE_FILE={COMPOSE_FILE.name}:{HA_FILE.name}"} <= set(lines)
    # The example's value is the compose file's own default.
    assert "${AGENTS_CONCURRENCY:-" + env_example["AGENTS_CONCURRENCY"] + "}" in COMPOSE_FILE.read_text()
    # Required by the compose file: left empty so that `${...:?}` stops a copy that was never filled in.
    assert env_example["VALKEY_PASSWORD"] == env_example["FLOWER_BASIC_AUTH"] == ""


# --- valkey, flower, healthchecks, volumes ----------------------------------------------------------------------


def volume_names_of(compose: dict[str, Any]) -> set[str]:
    return set(compose.get("volumes") or {})


def test_valkey_persists_never_evicts_and_requires_a_password(compose: dict[str, Any]) -> None:
    valkey = compose["services"]["valkey"]
    args = argv(valkey)
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--maxmemory-policy") == "noeviction"
    assert (option(args, "--requirepass") or "").startswith("${VALKEY_PASSWORD:?")
    assert volume_targets(valkey)["/data"] in volume_names_of(compose)
    check = " ".join(valkey["healthcheck"]["test"])
    assert "valkey-cli" in check and " -a " in check and "ping" in check


def test_flower_requires_basic_auth_and_serves_5555(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert str(environment(flower)["FLOWER_BASIC_AUTH"]).startswith("${FLOWER_BASIC_AUTH:?")
    assert any(str(port).endswith("5555:5555") for port in flower["ports"])


def test_every_service_but_beat_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    # beat is the exception: it answers no remote-control ping and serves no port, so it has no cheap, reliable
    # liveness probe (docker-compose.yml says so next to the service); `restart` covers a crash.
    for name, service in services.items():
        if name == "beat":
            assert "healthcheck" not in service
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    for name, args in workers(services).items():
        node = (option(args, "-n", "--hostname") or "").split("@")[0]
        test = " ".join(services[name]["healthcheck"]["test"])
        # `$$` is compose's escape: the container's shell expands $HOSTNAME, which is what %h is in the worker.
        assert f"celery -A orchestrator inspect ping -d {node}@$$HOSTNAME" in test, name


def test_volumes_hold_the_workspace_and_the_beat_schedule(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    named = volume_names_of(compose)
    workspace = compose["x-fleet-env"]["ORCHESTRATOR_WORKSPACE_DIR"]
    # Each agents container keeps its worktrees in a volume of its own (anonymous): checkpoints carry the work, so
    # nothing is shared between workers, and a scaled-out agents service must not share one either.
    assert volume_targets(services["agents"]).get(workspace) == ""
    assert workspace not in volume_targets(services["ops"])
    assert not any(workspace in volume_targets(s) and volume_targets(s)[workspace] in named for s in services.values())
    schedule = option(argv(services["beat"]), "-s", "--schedule")
    assert schedule is not None
    assert volume_targets(services["beat"]).get(str(PurePosixPath(schedule).parent)) in named


def test_agents_can_run_bubblewrap(services: dict[str, dict[str, Any]]) -> None:
    assert set(services["agents"]["security_opt"]) == {"seccomp=unconfined", "apparmor=unconfined"}


def test_agents_worker_has_time_for_a_warm_shutdown(services: dict[str, dict[str, Any]]) -> None:
    grace = str(services["agents"]["stop_grace_period"])
    m = re.fullmatch(r"(\d+)(s|m)", grace)
    assert m, grace
    assert int(m.group(1)) * (60 if m.group(2) == "m" else 1) >= 60


# --- the "ha" profile: a replica, three sentinels, and the fleet pointed at them ---------------------------------


@pytest.fixture(scope="module")
def ha() -> dict[str, Any]:
    data = yaml.safe_load(HA_FILE.read_text())
    assert isinstance(data, dict)
    return data


def sentinel_conf(service: dict[str, Any], tmp_path: Path, password: str = "s3cret",
                  master: str = "mymaster") -> str:
    """Run a sentinel service's script as the container would, up to its `exec`: the config it writes."""
    script = interpolate(argv(service)[2], ORCHESTRATOR_SENTINEL_MASTER=master)
    assert script.count("/data/") == 1
    script = script.replace("/data/", f"{tmp_path}/").replace("exec valkey-server", "exit 0; valkey-server")
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ["PATH"], **{k: interpolate(str(v), VALKEY_PASSWORD=password)
                                          for k, v in environment(service).items()}}
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=30)
    return (tmp_path / "sentinel.conf").read_text()


def test_the_replica_follows_valkey_and_every_data_node_can_change_roles(services: dict[str, dict[str, Any]],
                                                                         compose: dict[str, Any]) -> None:
    for name, announced in (("valkey", "valkey"), ("valkey-replica", "valkey-replica")):
        args = argv(services[name])
        assert option(args, "--appendonly") == "yes" and option(args, "--maxmemory-policy") == "noeviction", name
        for flag in ("--requirepass", "--masterauth"):  # after a failover either one replicates from the other
            assert (option(args, flag) or "").startswith("${VALKEY_PASSWORD:?"), (name, flag)
        assert option(args, "--replica-announce-ip") == announced, name
        assert volume_targets(services[name])["/data"] in volume_names_of(compose), name
    replica = argv(services["valkey-replica"])
    assert replica[replica.index("--replicaof") + 1:replica.index("--replicaof") + 3] == ["valkey", "6379"]
    assert "--replicaof" not in argv(services["valkey"])
    assert services["valkey-replica"]["depends_on"]["valkey"]["condition"] == "service_healthy"


def test_three_sentinels_with_their_own_state_watch_valkey(services: dict[str, dict[str, Any]],
                                                          tmp_path: Path) -> None:
    volumes = {volume_targets(services[name])["/data"] for name in SENTINELS}
    assert len(volumes) == 3, "each sentinel rewrites its own config: one volume each"
    for i, name in enumerate(SENTINELS):
        conf = sentinel_conf(services[name], tmp_path / name)
        lines = conf.splitlines()
        assert "sentinel monitor mymaster valkey 6379 2" in lines  # quorum 2 of 3
        assert 'sentinel auth-pass mymaster "s3cret"' in lines and 'requirepass "s3cret"' in lines
        assert 'sentinel sentinel-pass "s3cret"' in lines
        assert {"sentinel resolve-hostnames yes", "sentinel announce-hostnames yes",
                f"sentinel announce-ip {name}", "port 26379"} <= set(lines)
        assert lines.index("sentinel resolve-hostnames yes") < lines.index("sentinel monitor mymaster valkey 6379 2")
        assert environment(services[name])["SENTINEL_NAME"] == name
        check = " ".join(services[name]["healthcheck"]["test"])
        assert "-p 26379" in check and " -a " in check and "ping" in check
        if i == 0:  # written once: Sentinel's own rewrites survive a restart
            (tmp_path / name / "sentinel.conf").write_text("kept\n")
            assert sentinel_conf(services[name], tmp_path / name) == "kept\n"
    # The master name follows the fleet's setting.
    assert "sentinel monitor fleet-a valkey 6379 2" in sentinel_conf(services["sentinel-2"], tmp_path / "named",
                                                                    master="fleet-a")


def test_a_sentinel_config_from_compose_is_one_valkey_sentinel_accepts(services: dict[str, dict[str, Any]],
                                                                      tmp_path: Path) -> None:
    """The generated file, with the compose host names swapped for loopback, starts a real sentinel."""
    conf = sentinel_conf(services["sentinel-1"], tmp_path)
    port = free_port()
    conf = conf.replace("port 26379", f"port {port}").replace(" valkey 6379 ", " 127.0.0.1 6399 ")
    path = tmp_path / "sentinel.conf"
    path.write_text(conf)
    binary = find_valkey()
    assert binary, "valkey-server is needed"
    proc = Proc([binary, str(path), "--sentinel"], log_path=tmp_path / "sentinel.log")
    try:
        def answers() -> bool:
            try:
                with redis.Redis(port=port, password="s3cret", socket_timeout=2) as c:
                    return bool(c.execute_command("SENTINEL", "MASTERS"))
            except redis.RedisError:
                assert proc.alive(), proc.log()
                return False
        wait_until(answers, 15, "the sentinel")
    finally:
        proc.stop()


def test_the_ha_file_points_every_fleet_service_at_the_sentinels(
    ha: dict[str, Any], services: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch
) -> None:
    assert set(ha["services"]) == set(APP_SERVICES), "the HA file only re-points the fleet"
    env = ha["x-fleet-ha-env"]
    for name in APP_SERVICES:
        service = ha["services"][name]
        assert service["environment"] == env, name
        for sentinel in SENTINELS:
            assert service["depends_on"][sentinel]["condition"] == "service_healthy", name
    assert set(env) <= SETTING_VARS
    for key, db in (("ORCHESTRATOR_BROKER_URL", 0), ("ORCHESTRATOR_RESULT_BACKEND", 1)):
        assert env[key] == ";".join(f"sentinel://:${{VALKEY_PASSWORD}}@{s}:26379/{db}" for s in SENTINELS)
    assert env["ORCHESTRATOR_SENTINEL_MASTER"] == "${ORCHESTRATOR_SENTINEL_MASTER:-mymaster}"
    assert int(env["ORCHESTRATOR_STATE_WAIT_REPLICAS"]) == 1  # the profile runs one replica
    deployed = settings_from({k: interpolate(str(v), VALKEY_PASSWORD="s3cret") for k, v in env.items()}, clean_env)
    assert deployed.state_redis_url.count("/2") == 3 and deployed.result_backend_url.count("/1") == 3
    for url in (deployed.broker_url, deployed.result_backend_url):
        assert deployed.sentinel_transport_options(url) == {
            "master_name": "mymaster",
            "sentinel_kwargs": {"password": "s3cret", "socket_connect_timeout": 5.0, "socket_timeout": 5.0}}


# --- image ---------------------------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_python_311_image_with_git() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"apt-get install[^\n]*\bgit\b", text)
    assert re.search(r"\bpip install\b", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}


def test_dockerignore_keeps_secrets_and_history_out() -> None:
    rules = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert rules[0] == "*", "an allowlist: nothing is sent unless named"
    assert not {"!.env", "!.git", "!.venv", "!.env.example"} & set(rules)
    for needed in ("!pyproject.toml", "!README.md", "!beat_schedule.py", "!orchestrator/", "!workers/"):
        assert needed in rules, f"{needed}: pip install . needs it"


# --- docker compose itself -----------------------------------------------------------------------------------


def compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_compose_config(tmp_path: Path, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config -q` with only the given variables (an empty --env-file replaces any local .env)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    names = {name for name, _, _ in interpolations() + interpolations(HA_FILE)} | {"COMPOSE_FILE", "COMPOSE_PROFILES"}
    base = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(ENV_PREFIX)}
    return subprocess.run(
        ["docker", "compose", "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *extra, "--env-file",
         str(empty), "config", "-q"],
        env={**base, **env}, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    if not compose_available():
        pytest.skip("this docker client has no compose plugin (`docker compose version` fails)")
    ok = run_compose_config(tmp_path, VALKEY_PASSWORD="s3cret", FLOWER_BASIC_AUTH="admin:pw")
    assert ok.returncode == 0, ok.stderr
    ha = run_compose_config(tmp_path, "-f", str(HA_FILE), "--profile", "ha", VALKEY_PASSWORD="s3cret",
                            FLOWER_BASIC_AUTH="admin:pw")
    assert ha.returncode == 0, ha.stderr
    for missing in ("VALKEY_PASSWORD", "FLOWER_BASIC_AUTH"):
        given = {"VALKEY_PASSWORD": "s3cret", "FLOWER_BASIC_AUTH": "admin:pw"}
        del given[missing]
        refused = run_compose_config(tmp_path, **given)
        assert refused.returncode != 0 and missing in refused.stderr, f"{missing} must be required"


def test_the_installed_package_carries_its_lua_scripts(tmp_path: Path) -> None:
    """The Docker image installs a wheel (not the source tree): the scripts must be in it."""
    import sys
    import zipfile

    src = tmp_path / "src"  # the tracked files only, as the image gets them: no local build/ to hide a gap
    src.mkdir()
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True,
                           text=True).stdout.split("\0")
    for name in filter(None, files):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("*.whl"))
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".lua")}
    assert shipped == {p.name for p in (ROOT / "orchestrator" / "lua").glob("*.lua")}
