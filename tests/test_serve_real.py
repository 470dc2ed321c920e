"""The search service over the shared real photos, indexed on S3 by ingest → extract → index.

A quarter of the photos, every scene, are sent as queries over HTTP (their bytes, as a user
would); the first result other than itself must be of its own scene for at least 0.95 of them.
The search page is driven in headless Chromium as a person would: choose a photo, press Search,
read the results.
"""

from __future__ import annotations

import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import requests
from PIL import Image
from playwright.sync_api import sync_playwright
from ray import serve

from cluster.client import SearchClient
from model import storage
from model.images import image_id as content_id
from model.kreciprocal import KReciprocalOptions, shortlist_order
from model.local_features import LocalFeatureOptions, LocalFeatures, read_local_features
from model.reranking import RerankSettings, rerank_query
from model.tables import IMAGES
from pipeline.serve import APP_NAME, ServeConf, build_app
from tests.conftest import REAL_LOCAL

pytestmark = pytest.mark.slow

KR_OPTIONS = KReciprocalOptions()
"""The service's k-reciprocal options (``ServeConf``'s defaults)."""


@pytest.fixture(scope="module")
def real_service(serve_url: str, real_run: str):
    serve.run(
        build_app(ServeConf(index=f"{real_run}/index", embedder_replicas=1)),
        name=APP_NAME,
        route_prefix="/",
    )
    try:
        yield SearchClient(serve_url, retries=8), real_run
    finally:
        serve.delete(APP_NAME)


def test_photos_as_http_queries_find_their_scene(real_service) -> None:
    """Every fourth photo of the 373 (every scene) sent as a query over HTTP."""
    client, run = real_service
    rows = IMAGES.read(
        f"{run}/images.parquet", ["image_id", "uri", "scene"], filter=pc.field("error").is_null()
    )
    photos = list(zip(*(rows[c].to_pylist() for c in ("image_id", "uri", "scene")), strict=True))
    scene = {image_id: s for image_id, _, s in photos}

    def query(photo: tuple[str, str, str]):
        return photo, client.search(storage.read_bytes(photo[1]), k=3)

    with ThreadPoolExecutor(4) as pool:  # concurrent requests: the embedder batches them
        answers = list(pool.map(query, photos[::4]))
    hits, itself_first, self_scores = [], [], []
    for (image_id, _, own_scene), answer in answers:
        first_other = next(r for r in answer.results if r.image_id != image_id)
        hits.append(scene[first_other.image_id] == own_scene)
        itself_first.append(answer.results[0].image_id == image_id)
        self_scores += [r.score for r in answer.results if r.image_id == image_id]
    recall = float(np.mean(hits))
    print(
        f"\nreal photos over HTTP: scene recall@1 {recall:.4f} over {len(answers)} photo queries; "
        f"the photo itself first for {np.mean(itself_first):.4f} (score {min(self_scores):.4f}+)"
    )
    assert len(photos) == 373 and len({s for (_, _, s), _ in answers}) == 17
    assert recall >= 0.95
    # The embedder describes a photo exactly as the extract stage did: it finds itself.
    assert np.mean(itself_first) >= 0.99 and min(self_scores) > 0.999
    assert all(r.uri and storage.is_file(r.uri) for _, a in answers[:5] for r in a.results)


def test_thumbnails_are_small_upright_jpegs(real_service) -> None:
    client, run = real_service
    rows = IMAGES.read(
        f"{run}/images.parquet",
        ["image_id", "width", "height"],
        filter=pc.field("error").is_null(),
    )
    image_id, width, height = (rows[c][0].as_py() for c in ("image_id", "width", "height"))
    with Image.open(io.BytesIO(client.image(image_id))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
        assert (thumb.width >= thumb.height) == (width >= height)  # same orientation


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed; .ci/run installs it"
)
def test_the_search_page_in_headless_chromium(real_service, serve_url, photos_dir, tmp_path):
    client, _ = real_service
    query = sorted((photos_dir / "NLE_tower").glob("*.jpg"))[0]
    shot = Path(os.environ.get("CIRRAY_SCREENSHOT", tmp_path / "search_page.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(serve_url + "/")
        page.wait_for_function("document.getElementById('info').textContent.includes('index v')")
        page.set_input_files("#photo", str(query))
        page.click("#submit")
        page.wait_for_selector("#results .result img", timeout=60_000)
        loaded = "[...document.querySelectorAll('#results img')].every(i => i.naturalWidth)"
        page.wait_for_function(loaded)
        cards = page.query_selector_all("#results .result")
        scores = [float(c.query_selector(".score").inner_text()) for c in cards]
        names = [c.query_selector(".id").inner_text() for c in cards]
        status = page.inner_text("#status")
        page.screenshot(path=str(shot), full_page=True)
        page.check("#rerank")  # the geometry switch: the same photo, its top 100 verified
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').textContent.includes('verified')")
        checked = page.inner_text("#status")
        inliers = [
            int(c.query_selector(".inliers").inner_text().split()[0])
            for c in page.query_selector_all("#results .result")
            if c.query_selector(".inliers")
        ]
        page.check("#kreciprocal")  # and shared neighbours first: k-reciprocal, then geometry
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').textContent.includes('shared')")
        both = page.inner_text("#status")
        shown = [c.query_selector(".id").inner_text() for c in page.query_selector_all(".result")]
        browser.close()
    asked_both = client.search(query, k=12, rerank=100, kreciprocal=100)
    assert shown == [r.uri for r in asked_both.results]
    assert "the top 100 re-ordered by shared neighbours" in both and "verified" in both
    reranked = client.search(query, k=12, rerank=100)
    assert inliers == [r.inliers for r in reranked.results if r.inliers is not None]
    assert f"{reranked.reranked['verified']} of the top 100 verified" in checked
    assert inliers and inliers[0] >= 12
    assert len(cards) == 12 and "12 results from index v1" in status
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.999
    assert Path(names[0]).name == query.name  # the photo itself comes first
    same_scene = sum(Path(n).parent.name == "NLE_tower" for n in names[1:6])
    assert same_scene >= 4, names
    expected = client.search(query, k=12)
    assert scores == pytest.approx([r.score for r in expected.results], abs=1e-4)
    assert shot.stat().st_size > 50_000


def test_rerank_over_http_ranks_as_evaluate_does(
    real_service, real_photo_set, lite0_real_descriptors
) -> None:
    """POST /search?rerank=K answers with the ranking of ``model.reranking`` (what
    ``pipeline.evaluate --rerank`` runs) over the same descriptors and photos: the same
    verified photos first with the same inliers, the rest in global order."""
    client, _ = real_service
    paths = [Path(p) for p in real_photo_set.db_paths]
    ids = [content_id(p.read_bytes()) for p in paths]
    db = lite0_real_descriptors
    options = LocalFeatureOptions(**REAL_LOCAL)
    settings = RerankSettings(rerank=40)
    cached: dict[int, LocalFeatures] = {}

    def features_of(rows):
        for r in rows:
            if r not in cached:
                found = read_local_features(paths[r].read_bytes(), options, exif_transpose=True)
                cached[r] = found
        return [cached[r] for r in rows]

    scenes = {}
    for row, path in enumerate(paths):
        scenes.setdefault(path.parent.name, row)
    moved = verified = 0
    one_by_one = []
    for row in list(scenes.values())[::3]:  # six scenes
        answer = client.search(paths[row].read_bytes(), k=20, rerank=40)
        one_by_one.append(answer)
        expected = rerank_query(
            db[row],
            db,
            np.argsort(-(db @ db[row]), kind="stable")[:40],
            query_features=features_of([row])[0],
            features_of=features_of,
            settings=settings,
        )
        global_order = np.argsort(-(db @ db[row]), kind="stable")
        rest = [r for r in global_order[:40] if r not in set(expected.promoted.tolist())]
        ranking = [*expected.promoted.tolist(), *rest][:20]
        assert answer.image_ids == [ids[r] for r in ranking]
        promoted = {ids[r]: expected.inliers[r] for r in expected.promoted.tolist()}
        assert {r.image_id: r.inliers for r in answer.results[: len(promoted)]} == promoted
        assert answer.reranked["candidates"] == 40 and answer.reranked["without_features"] == 0
        moved += answer.image_ids[:20] != [ids[r] for r in global_order[:20]]
        verified += len(promoted)
    print(f"\nrerank over HTTP: {verified} verified in 6 queries, {moved} rankings changed")
    assert verified > 6
    # the same photos in one batch request, with one that is no photo: the same answers
    photos = [paths[row].read_bytes() for row in list(scenes.values())[::3]]
    batch = client.search_batch(photos=[*photos, b"not a photo"], k=20, rerank=40)
    assert batch[:-1] == one_by_one and "not a usable photo" in str(batch[-1])
    # k-reciprocal first (the top 30 over the query and those photos), then verification of
    # the top 40: what evaluate --kreciprocal-top 30 --rerank 40 ranks. k-reciprocal sets
    # turn on near-ties, so the query's descriptor is the one the service computed for it.
    embedder = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
    for row in list(scenes.values())[1::6]:
        photo = paths[row].read_bytes()
        answer = client.search(photo, k=20, rerank=40, kreciprocal=30)
        query = embedder.embed.remote(photo, answer.version).result()
        global_order = np.argsort(-(db @ query), kind="stable")
        head = global_order[:30][shortlist_order(query, db[global_order[:30]], KR_OPTIONS)]
        base = np.concatenate([head, global_order[30:]])
        expected = rerank_query(
            query,
            db,
            base[:40],
            query_features=features_of([row])[0],
            features_of=features_of,
            settings=settings,
        )
        rest = [r for r in base[:40] if r not in set(expected.promoted.tolist())]
        ranking = [*expected.promoted.tolist(), *rest][:20]
        assert answer.image_ids == [ids[r] for r in ranking]
        assert answer.reranked["candidates"] == 40


def test_rerank_bad_input_is_answered(real_service) -> None:
    client, _ = real_service
    blank = io.BytesIO()
    Image.new("RGB", (320, 240), (128, 128, 128)).save(blank, format="JPEG")
    answer = client.search(blank.getvalue(), k=5, rerank=1000)  # more than the index holds
    assert len(answer.results) == 5 and answer.reranked["query_features"] == 0
    assert answer.reranked["verified"] == 0 and answer.reranked["candidates"] == 373
    response = requests.post(
        f"{client.url}/search", params={"rerank": 5}, json={"vector": [1.0] * 1280}, timeout=60
    )
    assert response.status_code == 422 and "photo" in response.json()["detail"]
