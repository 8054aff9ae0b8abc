"""REST API of med2e3.server with the tiny model: uploads, questions, slices, limits, token, TTL, queue."""

from __future__ import annotations

import gzip
import io
import json
import stat
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from server_helpers import (
    dicom_file_bytes,
    dicom_zip_bytes,
    nifti_bytes,
    npy_bytes,
    upload,
)

from med2e3.errors import ConfigError
from med2e3.server import ServerSettings
from med2e3.server.cli import main as serve_main
from med2e3.server.settings import check_bind
from med2e3.server.uploads import UploadError, _copy_dicom_entries

TOKEN = "0123456789abcdef-test-token"


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def _error(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def _stored_files(client) -> list[Path]:
    return sorted(p for p in client.app.state.server.store.root.rglob("*") if p.is_file())


# ---- happy paths ------------------------------------------------------------------------------------


def test_health_and_info(client) -> None:
    health = client.get("/api/health").json()
    assert health == {"status": "ok", "model": "tiny", "pending": 0, "capacity": 5, "volumes": 0, "loaded": 0}
    info = client.get("/api/info").json()
    assert info["num_slices"] == 32
    assert info["windows"] == ["abdomen", "lung", "bone", "brain", "minmax"]
    assert set(info["examples"]) == {"Plane", "Phase", "Organ", "Abnormality", "Location"}


@pytest.mark.parametrize(
    ("data", "shape", "spacing", "stored"),
    [
        (npy_bytes(), [24, 40, 48], [1.0, 1.0, 1.0], "volume.npy"),
        (nifti_bytes(compress=True), [40, 96, 96], None, "volume.nii.gz"),
        (nifti_bytes(compress=False), [40, 96, 96], None, "volume.nii"),
        (dicom_zip_bytes(), [12, 32, 40], [2.5, 0.8, 0.8], "dicom/00011-IM0011.dcm"),
    ],
    ids=["npy", "nii.gz", "nii", "dicom-zip"],
)
def test_upload_each_format(client, data: bytes, shape: list, spacing: list | None, stored: str) -> None:
    # the client's name is a label only: content decides the type, and nothing is written under that name
    response = upload(client, data, name="../../etc/scan.dat")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["shape"] == shape and body["n_slices"] == shape[0]
    assert len(body["id"]) == 32 and body["name"] == "scan.dat"
    if spacing is not None:
        assert body["spacing"] == pytest.approx(spacing)
    folder = client.app.state.server.store.root / body["id"]
    assert (folder / stored).is_file()
    assert {p.name for p in folder.iterdir()} <= {"volume.npy", "volume.nii.gz", "volume.nii", "dicom"}
    if stored.startswith("dicom"):  # the zip is gone; only the 12 DICOM slices were written (README skipped)
        assert len(list((folder / "dicom").iterdir())) == 12


@pytest.mark.filterwarnings("ignore::med2e3.data.io.VolumeWarning")  # the server log's copy of it
def test_upload_says_when_the_ct_window_does_not_suit_the_volume(client) -> None:
    assert upload(client, nifti_bytes()).json()["warning"] is None  # a CT: air, fat and soft tissue
    rng = np.random.default_rng(0)
    mri = rng.uniform(0, 1500, size=(48, 48, 24)).astype(np.float32)  # no air, no fat: not CT numbers
    data = gzip.compress(nib.Nifti1Image(mri, np.eye(4)).to_bytes())
    body = upload(client, data, name="t1.nii.gz").json()
    assert body["warning"].startswith("t1.nii.gz: intensities in [")  # named by the client's label ...
    assert "minmax" in body["warning"]
    assert str(client.app.state.server.store.root) not in body["warning"]  # ... never by a server path
    assert client.get(f"/api/volumes/{body['id']}").json()["warning"] == body["warning"]


def test_ask_reuses_the_encoding(client, predictor, monkeypatch) -> None:
    vid = upload(client, nifti_bytes()).json()["id"]
    loads = []
    original = predictor.load
    monkeypatch.setattr(predictor, "load", lambda v: loads.append(v) or original(v))
    answers = [
        client.post(f"/api/volumes/{vid}/ask", json={"question": q}) for q in ("Which organ?", "Where?")
    ]
    assert loads == []  # encoded once, at upload
    for response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"question", "answer", "slice_scores", "slice_ranges", "top_slices", "notes"}
        assert isinstance(body["answer"], str)
        assert len(body["slice_scores"]) == 32 and sum(body["slice_scores"]) == pytest.approx(1, abs=1e-4)
        assert len(body["slice_ranges"]) == 32 and body["slice_ranges"][0][0] >= 0
        assert body["slice_ranges"][-1][1] <= 40
        assert len(body["top_slices"]) == 4
        assert body["slice_scores"][body["top_slices"][0]] == max(body["slice_scores"])


def test_report_and_streams(client) -> None:
    vid = upload(client, npy_bytes()).json()["id"]
    report = client.post(f"/api/volumes/{vid}/report")
    assert report.status_code == 200 and report.json()["question"].startswith(
        "Please write a radiology report"
    )
    for path, body in (("ask/stream", {"question": "Which organ?"}), ("report/stream", {})):
        with client.stream("POST", f"/api/volumes/{vid}/{path}", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            text = response.read().decode()
        events = [block.split("\n", 1) for block in text.strip().split("\n\n")]
        kinds = [head.removeprefix("event: ") for head, _ in events]
        assert kinds[-1] == "answer" and set(kinds[:-1]) <= {"piece"}, kinds
        final = json.loads(events[-1][1].removeprefix("data: "))
        streamed = "".join(json.loads(data.removeprefix("data: "))["text"] for _, data in events[:-1])
        assert final["answer"] == streamed and len(final["slice_scores"]) == 32


def test_slice_png_windows(client) -> None:
    vid = upload(client, nifti_bytes()).json()["id"]
    images = {}
    for window in ("abdomen", "lung", "bone", "brain", "minmax"):
        response = client.get(f"/api/volumes/{vid}/slices/20.png", params={"window": window})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG")
        image = np.asarray(Image.open(io.BytesIO(response.content)))
        assert image.shape == (96, 96) and image.dtype == np.uint8
        images[window] = image
    assert not np.array_equal(images["abdomen"], images["lung"])
    assert _error(client.get(f"/api/volumes/{vid}/slices/40.png")).startswith("slice 40 is out of range")
    assert "unknown window" in _error(client.get(f"/api/volumes/{vid}/slices/0.png?window=liver"))


def test_evicted_volume_is_encoded_again(make_client) -> None:
    client = make_client(max_loaded=1)
    first = upload(client, npy_bytes(seed=1)).json()["id"]
    upload(client, npy_bytes(seed=2))
    assert client.get("/api/health").json()["loaded"] == 1
    assert client.post(f"/api/volumes/{first}/ask", json={"question": "Where?"}).status_code == 200
    assert client.get(f"/api/volumes/{first}/slices/3.png").status_code == 200


def test_delete_and_unknown_ids(make_client) -> None:
    client = make_client(max_stored=1)
    first = upload(client, npy_bytes(seed=1)).json()["id"]
    second = upload(client, npy_bytes(seed=2)).json()["id"]
    response = client.post(f"/api/volumes/{first}/ask", json={"question": "x"})
    assert response.status_code == 404 and "expired" in _error(response)  # evicted: only 1 may stay on disk
    assert client.delete(f"/api/volumes/{second}").status_code == 204
    assert client.get(f"/api/volumes/{second}").status_code == 404
    assert _stored_files(client) == []
    assert client.get("/api/volumes/..%2F..%2Fetc/slices/0.png").status_code in (404, 422)


def test_bad_requests_are_clear_json(client) -> None:
    vid = upload(client, npy_bytes()).json()["id"]
    assert client.post(f"/api/volumes/{vid}/ask", json={"question": ""}).status_code == 422
    assert _error(client.post(f"/api/volumes/{vid}/ask", json={"question": "   "})) == "the question is empty"
    response = client.post(f"/api/volumes/{vid}/ask", json={"question": "x", "max_new_tokens": 999})
    assert response.status_code == 400 and "limit of 8" in _error(response)


def test_page_and_schema(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<title>Med-2E3</title>" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    for external in ('src="http', 'href="http', "url(http", "@import"):
        assert external not in page.text  # self-contained: nothing from a CDN
    paths = client.get("/api/openapi.json").json()["paths"]
    for path in (
        "/api/volumes",
        "/api/volumes/{vid}/slices/{k}.png",
        "/api/volumes/{vid}/ask",
        "/api/volumes/{vid}/report",
        "/api/health",
    ):
        assert path in paths
    assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


def test_model_failures_are_json(make_client, predictor, monkeypatch) -> None:
    client = make_client(raise_server_exceptions=False)
    vid = upload(client, npy_bytes()).json()["id"]

    def fail(error: Exception):
        def ask(*args, **kwargs):
            raise error

        return ask

    monkeypatch.setattr(predictor, "ask_batch", fail(torch.OutOfMemoryError("CUDA out of memory")))
    response = client.post(f"/api/volumes/{vid}/ask", json={"question": "x"})
    assert response.status_code == 503 and "ran out of memory" in _error(response)
    monkeypatch.setattr(predictor, "ask_batch", fail(RuntimeError("boom")))
    response = client.post(f"/api/volumes/{vid}/ask", json={"question": "x"})
    assert response.status_code == 500 and _error(response) == "internal server error (see the server log)"
    monkeypatch.undo()
    assert client.post(f"/api/volumes/{vid}/ask", json={"question": "x"}).status_code == 200


# ---- bad uploads ------------------------------------------------------------------------------------


def test_upload_too_big(make_client) -> None:
    client = make_client(max_upload_bytes=50_000)
    response = upload(client, npy_bytes(shape=(1, 24, 40, 48)))  # 184 kB
    assert response.status_code == 413 and "50,000" not in _error(response) and "limit" in _error(response)
    assert _stored_files(client) == []
    response = client.post("/api/volumes", content=b"x" * 10, headers={"content-length": str(10**9)})
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"hello, this is a text file" * 20, 415, "unsupported content"),
        (gzip.compress(b"not a nifti header" * 50), 415, "not a single-file NIfTI"),
        (b"\x1f\x8b" + b"\0" * 100, 400, "not a readable gzip file"),
        (dicom_file_bytes(np.zeros((8, 8)), 0, "1.2.3", "1.2.4"), 415, "single DICOM file"),
        (_zip([("notes.txt", b"hello" * 100)]), 415, "no DICOM files"),
        (b"PK\x03\x04" + b"\0" * 200, 400, "not a valid zip"),
        (b"\x93NUMPY garbage", 400, "not a readable .npy"),
        (b"", 400, "empty"),
    ],
    ids=[
        "text",
        "gzip-not-nifti",
        "broken-gzip",
        "single-dicom",
        "zip-no-dicom",
        "corrupt-zip",
        "bad-npy",
        "empty",
    ],
)
def test_upload_wrong_content(client, data: bytes, status: int, message: str) -> None:
    response = upload(client, data, name="scan.nii.gz")  # the extension is not believed
    assert response.status_code == status, response.text
    assert message in _error(response)
    assert _stored_files(client) == []


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _huge_npy_header() -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": (2048, 2048, 2048)}
    )
    return buffer.getvalue()


def _huge_nifti_header() -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    return gzip.compress(header.binaryblock + b"\0" * 4)


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (_npy(np.zeros((40, 40), np.float32)), 400, "expected a 3D image"),
        (_npy(np.full((4, 8, 8), np.nan, np.float32)), 400, "NaN"),
        (_npy(np.array([[["a"]]], dtype=object)), 400, "real numbers"),
        (_npy(np.full((4, 8, 8), 500, np.float32)), 400, "neither [0, 1] intensities nor CT numbers"),
        (_huge_npy_header(), 413, "more than the"),
        (_huge_nifti_header(), 413, "more than the"),
        (dicom_zip_bytes(n_slices=1), 400, "single DICOM image"),
        (_npy(np.full((2, 2, 2), 0.5, np.float32)), 400, "2x2x2 voxels is too small to be a scan"),
        (dicom_zip_bytes(damaged={11: b""}), 400, "DICOM file 00011-IM0011.dcm is empty"),
        (dicom_zip_bytes(damaged={5: b"\0" * 200}), 400, "DICOM file 00005-IM0005.dcm is not a DICOM file"),
        (
            dicom_zip_bytes(damaged={0: dicom_file_bytes(np.ones((32, 40)), 0, "1.2", "1.3")[:300]}),
            400,
            "IM0000.dcm has no pixel data",
        ),
    ],
    ids=[
        "2d",
        "nan",
        "object",
        "no-intensity",
        "npy-too-many-voxels",
        "nifti-too-many-voxels",
        "one-slice-series",
        "too-small",
        "empty-last-slice",
        "garbage-middle-slice",
        "truncated-first-slice",
    ],
)
def test_upload_not_a_volume(client, data: bytes, status: int, message: str) -> None:
    response = upload(client, data, name="my scan.npy")
    assert response.status_code == status, response.text
    error = _error(response)
    assert message in error and error.startswith("my scan.npy: ")
    assert "/tmp" not in error and "med2e3-server" not in error  # no server paths in messages


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("series/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _lying_zip(real: int, declared: int) -> bytes:
    """One DICOM-looking entry of ``real`` bytes whose headers claim ``declared`` bytes."""
    data = _zip([("series/IM0001", b"\0" * 128 + b"DICM" + b"\0" * (real - 132))])
    return data.replace(real.to_bytes(4, "little"), declared.to_bytes(4, "little"))


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (dicom_zip_bytes(extra={"../evil.dcm": b"x"}), 400, "'..' path component"),
        (dicom_zip_bytes(extra={"series/../../evil.dcm": b"x"}), 400, "'..' path component"),
        (dicom_zip_bytes(extra={"/etc/evil.dcm": b"x"}), 400, "absolute path"),
        (dicom_zip_bytes(extra={"C:/evil.dcm": b"x"}), 400, "absolute path"),
        (_zip([(_symlink_entry(), b"/etc/passwd")]), 400, "symbolic link"),
        (_zip([(f"f{i}", b"") for i in range(30)]), 413, "30 entries"),
        (_zip([("big.dcm", b"\0" * 3_000_000)]), 413, "expands to 2.9 MB"),
        (_lying_zip(real=3_000_000, declared=1000), 400, "Bad CRC"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "drive",
        "symlink",
        "too-many-entries",
        "bomb-declared",
        "bomb-actual",
    ],
)
def test_upload_hostile_zip(make_client, data: bytes, status: int, message: str) -> None:
    client = make_client(max_zip_entries=20, max_extracted_bytes=2_000_000)
    response = upload(client, data, name="series.zip")
    assert response.status_code == status, response.text
    assert message in _error(response)
    assert _stored_files(client) == []
    assert not (client.app.state.server.store.root.parent / "evil.dcm").exists()


def test_extraction_counts_real_bytes(tmp_path: Path) -> None:
    """The byte counter stops extraction even when declared sizes are not checked first."""
    data = _zip([(f"IM{i}", b"\0" * 128 + b"DICM" + b"\0" * 400_000) for i in range(3)])
    (tmp_path / "out").mkdir()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as archive,
        pytest.raises(UploadError, match="expands past") as err,
    ):
        _copy_dicom_entries(archive, archive.infolist(), tmp_path / "out", "s.zip", max_bytes=1_000_000)
    assert err.value.status == 413
    assert sum(p.stat().st_size for p in (tmp_path / "out").iterdir()) <= 1_000_000 + 2**20


def test_upload_needs_multipart_file(client) -> None:
    assert client.post("/api/volumes", content=npy_bytes()).status_code == 415
    response = client.post("/api/volumes", data={"note": "no file"}, files={"other": ("x.npy", b"1")})
    assert response.status_code == 400 and "'file' field" in _error(response)
    garbled = client.post(
        "/api/volumes",
        content=b"--b\r\nno headers here",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert garbled.status_code == 400 and "malformed multipart" in _error(garbled)


# ---- access control -----------------------------------------------------------------------------------


def test_token_required_everywhere(make_client) -> None:
    client = make_client(base_url="http://192.0.2.10:8000", token=TOKEN)  # as if bound to a LAN address
    for method, path in (
        ("get", "/api/health"),
        ("get", "/api/openapi.json"),
        ("post", "/api/volumes"),
    ):
        response = getattr(client, method)(path)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "token" in _error(response)
        wrong = getattr(client, method)(path, headers={"Authorization": "Bearer wrong-token-wrong-token"})
        assert wrong.status_code == 403 and _error(wrong) == "wrong token"
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/health", headers=good).status_code == 200
    # the page holds nothing private: served with the token in the URL, and without (a reload), where it asks
    for params in ({"token": TOKEN}, {}):
        page = client.get("/", params=params)
        assert page.status_code == 200 and 'id="token-form"' in page.text
    assert client.head("/").status_code == 200
    assert client.get("/api/health", params={"token": TOKEN}).status_code == 401  # the API may not
    vid = client.post("/api/volumes", files={"file": ("a.npy", npy_bytes())}, headers=good).json()["id"]
    assert client.post(f"/api/volumes/{vid}/ask", json={"question": "x"}, headers=good).status_code == 200
    assert client.get(f"/api/volumes/{vid}/slices/0.png").status_code == 401


def test_loopback_host_and_same_origin(make_client) -> None:
    client = make_client()
    assert (
        client.get("/api/health", headers={"Host": "evil.example:8000"}).status_code == 403
    )  # DNS rebinding
    assert client.get("/api/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/api/health", headers={"Host": "[::1]:8000"}).status_code == 200
    cross = client.post(
        "/api/volumes", files={"file": ("a.npy", npy_bytes())}, headers={"Origin": "http://evil.example"}
    )
    assert cross.status_code == 403 and "cross-origin" in _error(cross)
    same = client.get("/api/health", headers={"Origin": "http://127.0.0.1"})
    assert same.status_code == 200


def test_bind_rules_and_cli(model_dir: Path, capsys) -> None:
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("::1", None)
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0 without a token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(ConfigError, match="too short"):
        ServerSettings(token="short")
    assert serve_main(["--model", str(model_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("med2e3: error: refusing to listen on 0.0.0.0") and "\n" not in err
    assert serve_main(["--model", str(model_dir / "missing"), "--port", "0"]) == 2
    assert "model folder does not exist" in capsys.readouterr().err
    assert serve_main(["--model", str(model_dir), "--window", "liver"]) == 2
    assert "--window: unknown window 'liver'" in capsys.readouterr().err


def test_register_adds_serve() -> None:
    import argparse

    from med2e3.server import register

    parser = argparse.ArgumentParser(prog="med2e3")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "m", "--port", "0"])
    assert args.host == "127.0.0.1" and args.port == 0 and callable(args.handler)
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "example: med2e3 serve --model" in help_text and "--token" in help_text


# ---- lifetime and load ----------------------------------------------------------------------------------


def test_uploads_expire_and_are_deleted_on_shutdown(make_client) -> None:
    client = make_client(ttl_s=0.3, sweep_interval_s=0.1)
    vid = upload(client, npy_bytes()).json()["id"]
    root = client.app.state.server.store.root
    assert (root / vid / "volume.npy").is_file()
    deadline = time.monotonic() + 5
    while (root / vid).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (root / vid).exists()
    assert client.get(f"/api/volumes/{vid}").status_code == 404
    upload(client, npy_bytes())
    client.__exit__(None, None, None)
    assert not root.exists()


def _occupy(client) -> threading.Event:
    """Block the model thread until the returned event is set."""
    release = threading.Event()
    client.app.state.server.queue.submit(release.wait, 30)
    return release


def test_queue_full_is_503(make_client) -> None:
    client = make_client(max_waiting=0)
    vid = upload(client, npy_bytes()).json()["id"]
    release = _occupy(client)
    try:
        for response in (
            client.post(f"/api/volumes/{vid}/ask", json={"question": "x"}),
            client.post(f"/api/volumes/{vid}/ask/stream", json={"question": "x"}),
            client.post(f"/api/volumes/{vid}/report"),
            upload(client, npy_bytes()),
        ):
            assert response.status_code == 503 and response.headers["retry-after"] == "5"
            assert "the model is busy" in _error(response)
        assert client.get(f"/api/volumes/{vid}/slices/1.png").status_code == 200  # slices do not queue
        assert client.get("/api/health").json()["pending"] == 1
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while client.get("/api/health").json()["pending"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.post(f"/api/volumes/{vid}/ask", json={"question": "x"}).status_code == 200
    assert len(_stored_files(client)) == 1  # the refused upload left nothing behind


def test_request_timeout_is_504(make_client) -> None:
    client = make_client(max_waiting=1, request_timeout_s=0.3)
    vid = upload(client, npy_bytes()).json()["id"]
    release = _occupy(client)
    try:
        response = client.post(f"/api/volumes/{vid}/ask", json={"question": "x"})
        assert response.status_code == 504 and "did not answer within 0.3 s" in _error(response)
        with client.stream("POST", f"/api/volumes/{vid}/ask/stream", json={"question": "x"}) as stream:
            assert stream.status_code == 200
            assert "event: error" in stream.read().decode()
    finally:
        release.set()


# ---- issue 15: long questions, streamed text, size limits, requests beside an upload -------------------

LONG_QUESTION = "Is there a lesion in the liver near the portal vein, and how large is it? " * 10


def _events(response) -> list[tuple[str, dict]]:
    blocks = response.read().decode().strip().split("\n\n")
    return [
        (head.removeprefix("event: "), json.loads(data.removeprefix("data: ")))
        for head, data in (block.split("\n", 1) for block in blocks)
    ]


def test_head_and_get_page(client) -> None:
    assert client.head("/").status_code == 200
    assert client.get("/").status_code == 200


def test_long_question_is_answered_with_a_note(client) -> None:
    vid = upload(client, npy_bytes()).json()["id"]
    response = client.post(f"/api/volumes/{vid}/ask", json={"question": LONG_QUESTION})
    assert response.status_code == 200, response.text
    notes = response.json()["notes"]
    assert len(notes) == 1 and "TG-IS read only the first 128" in notes[0]
    with client.stream("POST", f"/api/volumes/{vid}/ask/stream", json={"question": LONG_QUESTION}) as stream:
        kind, final = _events(stream)[-1]
    assert kind == "answer" and final["notes"] == notes


def test_a_question_too_long_for_the_llm_is_400_before_the_stream(client) -> None:
    vid = upload(client, npy_bytes()).json()["id"]
    question = "".join(chr(0x4E00 + (i * 37) % 2000) for i in range(1500))
    for path in ("ask", "ask/stream"):
        response = client.post(f"/api/volumes/{vid}/{path}", json={"question": question})
        assert response.status_code == 400 and "too long for the language model" in _error(response)


def test_streamed_answer_equals_ask(client, predictor, monkeypatch) -> None:
    """No leading space in the stream that /ask lacks: answers start with a space-prefixed token, as a
    trained model's do (here forced by a generation bias towards ' liver')."""
    liver = predictor.processor.tokenizer(" liver", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(predictor.model.generation_config, "sequence_bias", {(liver[0],): 100.0})
    vid = upload(client, nifti_bytes()).json()["id"]
    for question in ("Which organ?", "Where is the lesion?"):
        asked = client.post(f"/api/volumes/{vid}/ask", json={"question": question}).json()
        with client.stream("POST", f"/api/volumes/{vid}/ask/stream", json={"question": question}) as stream:
            events = _events(stream)
        pieces = "".join(data["text"] for kind, data in events if kind == "piece")
        assert events[-1][0] == "answer"
        assert (
            events[-1][1]["answer"]
            == pieces
            == asked["answer"]
            == "liver liver liver liver liver liver liver liver"
        )
        assert events[-1][1]["slice_scores"] == pytest.approx(asked["slice_scores"], abs=1e-6)


def _nifti_header_only(shape: tuple[int, ...], dtype: type) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    return gzip.compress(header.binaryblock + b"\0" * 4)


def test_decompression_bomb_and_complex_voxels_are_refused(client) -> None:
    bomb = upload(client, _nifti_header_only((512, 512, 1024), np.float64), name="bomb.nii.gz")  # 2 GiB
    assert bomb.status_code == 413 and "more than the 1.0 GiB limit" in _error(bomb)
    assert _error(bomb).startswith("bomb.nii.gz: ") and "/tmp" not in _error(bomb)
    raw = nib.Nifti1Image(np.full((24, 24, 24), 1 + 2j, np.complex128), np.eye(4)).to_bytes()
    complex_ = upload(client, gzip.compress(raw), name="c.nii.gz")
    assert complex_.status_code == 400 and "real numbers, got dtype complex128" in _error(complex_)
    assert _stored_files(client) == []


def test_slices_health_and_info_do_not_wait_for_an_upload(make_client, predictor, monkeypatch) -> None:
    """While an upload is encoded (the model is busy), other requests answer at once, even a slice of
    an upload whose encoding left the cache."""
    client = make_client(max_loaded=1, request_timeout_s=20)
    first = upload(client, npy_bytes(seed=1)).json()["id"]
    upload(client, npy_bytes(seed=2))  # the first one's encoding leaves the cache
    busy, release = threading.Event(), threading.Event()
    original = predictor.load

    def slow_load(volume):
        busy.set()
        release.wait(20)
        return original(volume)

    monkeypatch.setattr(predictor, "load", slow_load)
    results = {}
    uploading = threading.Thread(target=lambda: results.update(upload=upload(client, nifti_bytes())))
    uploading.start()
    try:
        assert busy.wait(10)
        for path in (
            "/api/health",
            "/api/info",
            f"/api/volumes/{first}/slices/3.png",
            f"/api/volumes/{first}",
        ):
            start = time.monotonic()
            response = client.get(path)
            assert response.status_code == 200, response.text
            assert time.monotonic() - start < 3, path
    finally:
        release.set()
        uploading.join(30)
    assert results["upload"].status_code == 201
