"""Pushing an algorithm image and reporting the digest the hub must pin it by.

An experiment refers to an algorithm as ``repository@sha256:…`` so that what a spoke runs
is exactly what was reviewed. That is the *manifest* digest the registry computed, found in
``RepoDigests`` after a push; the image ``.Id`` (config digest) is a different hash and
cannot be pulled by.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from ._proc import ToolError, capture, run_command

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def split_reference(reference: str) -> tuple[str, str | None]:
    """Split ``registry:port/name:tag`` into ``(registry:port/name, tag)``."""
    if "@" in reference:
        raise ToolError(f"{reference!r} already names a digest; give a repository[:tag]")
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon + 1 :]
    return reference, None


def _pushed_digest(output: str) -> str | None:
    """The digest ``docker push`` announces (``<tag>: digest: sha256:… size: N``)."""
    for line in reversed(output.splitlines()):
        if "digest:" in line:
            match = _DIGEST.search(line)
            if match:
                return match.group(0)
    return None


def push_image(
    tag: str,
    repository: str,
    *,
    docker: str = "docker",
    verbose: bool = False,
    username: str | None = None,
    password: str | None = None,
) -> tuple[str, str]:
    """Tag ``tag`` as ``repository`` (``REGISTRY/REPO[:TAG]``), push it, return its digest.

    Returns ``(repository_without_tag, "sha256:…")``; the pinned reference is
    ``f"{repository}@{digest}"``. Without a tag in ``repository`` the source tag (or
    ``latest``) is used. With ``username`` and ``password`` (a federation's hub account),
    the push logs in to a token-protected registry first, in a throw-away Docker client
    configuration so the password is not left behind in ``~/.docker``.
    """
    repo, target_tag = split_reference(repository)
    if target_tag is None:
        source_tag = split_reference(tag)[1] if "@" not in tag else None
        target_tag = source_tag or "latest"
    target = f"{repo}:{target_tag}"
    run_command([docker, "tag", tag, target], verbose=verbose)
    if username and password:
        config_dir = tempfile.mkdtemp(prefix="tributary-docker-")
        env = {**os.environ, "DOCKER_CONFIG": config_dir}
        try:
            registry = repo.split("/", 1)[0]
            run_command([docker, "login", registry, "--username", username,
                         "--password-stdin"], env=env, stdin_text=password)
            pushed = run_command([docker, "push", target], verbose=False, env=env)
        finally:
            shutil.rmtree(config_dir, ignore_errors=True)
    elif username or password:
        raise ToolError("give both a username and a password for the registry, or neither")
    else:
        pushed = run_command([docker, "push", target], verbose=False)
    if verbose:
        print(pushed.stdout, end="")
    announced = _pushed_digest(pushed.stdout or "")
    raw = capture([docker, "image", "inspect", "--format", "{{json .RepoDigests}}", target])
    repo_digests = json.loads(raw.strip() or "[]") or []
    candidates = [
        entry.split("@", 1)[1]
        for entry in repo_digests
        if entry.split("@", 1)[0] == repo and "@" in entry
    ]
    if announced and announced in candidates:
        return repo, announced
    if len(candidates) == 1:
        return repo, candidates[0]
    if announced:
        return repo, announced
    raise ToolError(
        f"pushed {target} but found no manifest digest for {repo} (RepoDigests: {repo_digests})"
    )
