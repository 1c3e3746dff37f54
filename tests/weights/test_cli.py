"""Tests of the ``mobilesam`` command line: list, download, path, usage and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_mobilesam import cli
from napari_mobilesam import download as dl
from napari_mobilesam import weights as w

from .common import PAYLOAD, VIT_T, damaged, make_info, sparse_file

# --------------------------------------------------------------------------------- CLI


def test_cli_list(tiny, capsys, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny.pt").write_bytes(PAYLOAD)
    sparse_file(tmp_path / "cache" / "mobile_sam.pt", VIT_T["size"])  # zeros: wrong sha256
    sparse_file(tmp_path / "cache" / "sam_vit_b_01ec64.pth", 10)
    assert cli.main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line for line in out.splitlines() if line.startswith(("vit_", "tiny"))
    }
    assert sorted(lines) == ["tiny", "vit_b", "vit_h", "vit_l", "vit_t", "vit_t_synthetic_cells"]
    bundled = lines["vit_t_synthetic_cells"].split()
    assert bundled[4:6] == ["yes", "(bundled)"]  # not in the cache folder: in the package
    assert lines["tiny"].split()[1:5] == ["tiny.pt", "0.0", "MIT", "yes"]
    assert lines["vit_t"].split()[1:5] == ["mobile_sam.pt", "40.7", "Apache-2.0", "corrupt"]
    assert lines["vit_t"].endswith(str(tmp_path / "cache" / "mobile_sam.pt"))
    assert lines["vit_b"].split()[4] == "partial"
    assert lines["vit_h"].split()[2:5] == ["2564.6", "Apache-2.0", "no"]
    assert str(tmp_path / "cache") in out
    assert "mobilesam weights download NAME` replaces it" in out


def test_cli_download_via_mirror(server, tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)
    assert cli.main(["weights", "download", "tiny"]) == 0
    out, err = capsys.readouterr()
    dest = tmp_path / "cache" / "tiny.pt"
    assert out.strip() == str(dest) and dest.read_bytes() == PAYLOAD
    assert f"downloading 0.0 MB from {server.base}/tiny.pt" in err
    assert "tiny.pt" in err.splitlines()[-1] or "100%" in err  # progress bar

    assert cli.main(["weights", "download", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(dest) and "already in the cache (sha256 checked)" in err
    assert server.hits == ["/tiny.pt"]


def test_cli_download_replaces_a_damaged_file(server, tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)
    dest = damaged(tmp_path)
    assert cli.main(["weights", "path", "tiny"]) == 1
    assert "has the wrong sha256" in capsys.readouterr().err
    assert cli.main(["weights", "download", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert "has the wrong sha256 (damaged or replaced); downloading it again" in err
    assert "already in the cache" not in err
    assert out.strip() == str(dest) and dest.read_bytes() == PAYLOAD
    assert server.hits == ["/tiny.pt"]
    assert cli.main(["weights", "path", "tiny"]) == 0


def test_cli_download_quiet(server, tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)
    assert cli.main(["weights", "download", "--quiet", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "cache" / "tiny.pt") and err == ""


def test_cli_download_defaults_to_vit_t(monkeypatch, capsys, tmp_path):
    calls = []

    def fake_fetch(name, *, progress=True):
        calls.append((name, progress))
        return tmp_path / name

    monkeypatch.setattr(w, "fetch", fake_fetch)
    assert cli.main(["weights", "download", "-q"]) == 0
    assert calls == [("vit_t", False)]


def test_cli_download_failure(tiny, dead_url, monkeypatch, capsys):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)
    assert cli.main(["weights", "download", "tiny"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "mobilesam: error: could not download" in err and "Traceback" not in err
    assert dead_url + "/tiny.pt" in err and "--weights PATH" in err


def test_cli_download_some_fail(server, tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(w.REGISTRY, "tiny2", make_info(name="tiny2", filename="tiny2.pt"))
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)  # tiny2.pt is not served: 404
    assert cli.main(["weights", "download", "-q", "tiny2", "tiny"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "cache" / "tiny.pt")
    assert "HTTP 404" in err and "1 of 2 downloads failed" in err


def test_cli_download_unknown_name_downloads_nothing(monkeypatch, capsys):
    monkeypatch.setattr(w, "fetch", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    assert cli.main(["weights", "download", "vit_t", "vit_x"]) == 2
    err = capsys.readouterr().err
    assert "unknown model name 'vit_x'" in err and "vit_h" in err and "Traceback" not in err


def test_cli_path(capsys, tmp_path):
    expected = tmp_path / "cache" / "mobile_sam.pt"
    assert cli.main(["weights", "path", "vit_t"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert str(expected) in err and "does not exist yet" in err
    assert "mobilesam weights download vit_t" in err

    assert cli.main(["weights", "path", "--no-check", "vit_t"]) == 0
    assert capsys.readouterr().out.strip() == str(expected)

    sparse_file(expected, 100)
    assert cli.main(["weights", "path", "vit_t"]) == 1
    assert "is incomplete" in capsys.readouterr().err

    sparse_file(expected, VIT_T["size"])  # the right size, but zeros
    assert cli.main(["weights", "path", "vit_t"]) == 1
    assert "has the wrong sha256" in capsys.readouterr().err
    assert cli.main(["weights", "path", "--no-check", "vit_t"]) == 0
    assert capsys.readouterr().out.strip() == str(expected)


def test_cli_path_of_a_good_file(tiny, capsys, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny.pt").write_bytes(PAYLOAD)
    assert cli.main(["weights", "path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / "tiny.pt")


def test_cli_path_unknown_name(capsys):
    assert cli.main(["weights", "path", "vit_x"]) == 2
    assert "unknown model name 'vit_x'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "status"),
    [([], 2), (["weights"], 2), (["weights", "nope"], 2), (["--help"], 0), (["--version"], 0)],
)
def test_cli_usage(argv, status, capsys):
    assert cli.main(argv) == status
    out, err = capsys.readouterr()
    assert "usage:" in out + err or "mobilesam 0" in out


def test_cli_ctrl_c(monkeypatch, capsys):
    def interrupted(name, *, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(w, "fetch", interrupted)
    assert cli.main(["weights", "download", "-q"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_cli_weights_error_from_a_command(monkeypatch, capsys):
    info = make_info()

    def add_failing(subparsers):
        def run(args):
            raise dl._error(info, info.url, Path("/x/tiny.pt"), "some reason")

        subparsers.add_parser("fail").set_defaults(func=run)

    monkeypatch.setattr(cli, "_GROUPS", [*cli._GROUPS, add_failing])
    assert cli.main(["fail"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mobilesam: error: could not download") and "some reason" in err


def test_cli_new_command_groups_plug_in(monkeypatch, capsys):
    def add_hello(subparsers):
        p = subparsers.add_parser("hello")
        p.set_defaults(func=lambda args: print("hi") or 0)

    monkeypatch.setattr(cli, "_GROUPS", [*cli._GROUPS, add_hello])
    assert cli.main(["hello"]) == 0
    assert capsys.readouterr().out == "hi\n"
    assert cli.main(["weights", "list"]) == 0
