"""`serve_app.ingress`: the environment each Serve ingress mode needs, and its refusals.
(That the chosen mode is in effect on a running platform: tests/test_platform.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from proctor.settings import SettingsError, load_settings
from serve_app import ingress
from serve_app.ingress import IngressError, ingress_env
from serve_app.platform import PlatformError, ray_env


def test_each_mode_sets_both_of_serves_flags() -> None:
    flags = ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY")
    assert [tuple(ingress_env(m)[f] for f in flags) for m in ingress.MODES] == [("0", "0"), ("1", "0"), ("1", "1")]
    assert not any(k.startswith("RAY_SERVE_HAPROXY") for m in ("proxy", "direct") for k in ingress_env(m))


def test_haproxy_mode_names_debians_haproxy_and_its_ports() -> None:
    env = ingress_env("haproxy", stats_port=18404, metrics_port=19101)
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == ingress.DEBIAN_HAPROXY  # scripts/setup.sh installs it
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == ("18404", "19101")


def test_haproxys_files_go_under_a_folder_only_when_its_socket_path_fits(tmp_path: Path) -> None:
    short = ingress_env("haproxy", folder=Path("/tmp/p/haproxy"))
    assert short["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/tmp/p/haproxy/admin.sock"
    assert short["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == "/tmp/p/haproxy/haproxy.cfg"
    long = ingress_env("haproxy", folder=Path("/tmp") / ("x" * 40) / "haproxy")
    assert not any(k.startswith("RAY_SERVE_HAPROXY_SOCKET") for k in long)  # Serve's default, /tmp/haproxy-serve


def test_an_unknown_mode_is_refused_naming_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(IngressError, match="'nginx' is not an ingress mode; known: proxy, direct, haproxy"):
        ingress_env("nginx")  # type: ignore[arg-type]
    monkeypatch.setenv("PROCTOR_SERVE_INGRESS", "nginx")
    with pytest.raises(SettingsError, match="PROCTOR_SERVE_INGRESS"):
        load_settings()


def test_without_haproxy_up_refuses_and_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ingress, "DEBIAN_HAPROXY", str(tmp_path / "no-haproxy"))
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing named haproxy on it
    with pytest.raises(PlatformError, match=r"install Debian's `haproxy` .* or set PROCTOR_SERVE_INGRESS=proxy"):
        ray_env(load_settings(home=tmp_path))
    assert ray_env(load_settings(home=tmp_path, serve_ingress="proxy"))["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_the_ray_heads_environment_carries_the_mode_over_the_users_shell(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # left in the user's shell
    env = ray_env(load_settings(home=tmp_path, serve_ingress="direct"))
    assert (env["RAY_SERVE_ENABLE_HA_PROXY"], env["RAY_SERVE_ENABLE_DIRECT_INGRESS"]) == ("0", "1")
