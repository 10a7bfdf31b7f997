"""A conversation is a chain (CONTRACT §9): history, undo, and editing an earlier picture, in process."""

from __future__ import annotations

import pytest


def generate(client, headers=None, **params):
    return client.get("/nanobanana", query_string=params, headers=headers or {})


def chain(client, user_id: str, headers=None) -> list[dict]:
    return client.get(f"/nanobanana/history/{user_id}", headers=headers or {}).json["chain"]


def test_three_edits_an_undo_and_an_edit_of_the_first(client, emulated):
    first = generate(client, prompt="a cat", user_id="ann").json
    second = generate(client, prompt="make it blue", user_id="ann").json
    third = generate(client, prompt="add a hat", user_id="ann").json
    assert [step["prompt"] for step in chain(client, "ann")] == ["a cat", "make it blue", "add a hat"]
    assert second["source_image_urls"] == [first["image_url"]] and third["source_image_urls"] == [second["image_url"]]

    undone = client.post("/nanobanana/history/ann/undo")
    assert undone.status_code == 200
    assert [step["task_id"] for step in undone.json["chain"]] == [first["task_id"], second["task_id"]]
    assert undone.json["last_image_url"] == second["image_url"]

    branch = generate(client, prompt="make it green", user_id="ann", from_task=first["task_id"]).json
    assert branch["mode"] == "image-to-image" and branch["used_previous_image"] is True
    assert emulated.tasks[branch["upstream_task_id"]].params["imageUrls"] == [first["image_url"]]
    history = client.get("/nanobanana/history/ann").json
    assert [step["prompt"] for step in history["chain"]] == ["a cat", "make it blue", "make it green"]
    assert history["last_image_url"] == branch["image_url"]
    assert history["chain"][0] == {
        "task_id": first["task_id"],
        "image_url": first["image_url"],
        "prompt": "a cat",
        "created_at": history["chain"][0]["created_at"],
    }


def test_the_next_edit_after_an_undo_edits_the_picture_before(client):
    first = generate(client, prompt="a cat", user_id="bo").json
    generate(client, prompt="make it blue", user_id="bo")
    client.post("/nanobanana/history/bo/undo")
    again = generate(client, prompt="make it red", user_id="bo").json
    assert again["source_image_urls"] == [first["image_url"]]


def test_undo_of_an_empty_chain_is_409(client):
    answer = client.post("/nanobanana/history/nobody/undo")
    assert answer.status_code == 409 and answer.json["error"]["code"] == "nothing_to_undo"


def test_from_task_by_the_upstreams_id_too(client, emulated):
    first = generate(client, prompt="a cat", user_id="cy").json
    edit = generate(client, prompt="make it blue", from_task=first["upstream_task_id"]).json
    assert edit["source_image_urls"] == [first["image_url"]]


@pytest.mark.parametrize("whose", ["unknown", "failed", "other token"])
def test_from_task_that_is_not_a_finished_picture_of_yours_is_404(make_app, emulated, whose):
    guarded = make_app(access_tokens=("mine", "theirs")).test_client()
    mine, theirs = {"Authorization": "Bearer mine"}, {"Authorization": "Bearer theirs"}
    task_id = {
        "unknown": lambda: "no-such-task",
        "failed": lambda: generate(guarded, mine, prompt="[fail] a cat").json["task_id"],
        "other token": lambda: generate(guarded, theirs, prompt="a cat").json["task_id"],
    }[whose]()
    submitted = len(emulated.submissions())
    answer = generate(guarded, mine, prompt="make it blue", from_task=task_id)
    assert answer.status_code == 404 and answer.json["error"]["code"] == "not_found"
    assert len(emulated.submissions()) == submitted


def test_delete_forgets_the_chain(client):
    generate(client, prompt="a cat", user_id="dee")
    client.delete("/nanobanana/history/dee")
    assert chain(client, "dee") == []
    assert generate(client, prompt="a dog", user_id="dee").json["mode"] == "text-to-image"
