"""List-then-watch of one Kubernetes collection, cached as plain JSON dicts.

The controller follows RayClusterFleets, RayClusters and ControllerRevisions with it, and
the gateway's discovery follows serving pods. One daemon thread per informer runs the loop
client-go's reflector runs:

1. list the collection (``limit``/``continue`` pages, one consistent snapshot), replace the
   cache, report objects that vanished since the previous list as ``DELETED``, then call
   ``on_relist`` with everything;
2. watch from the list's resourceVersion with bookmarks, remembering the newest
   resourceVersion of every event, and reopen the watch from it when the server ends it
   (``timeoutSeconds``: short, so ``stop`` is never stuck behind a long request);
3. on 410 Gone, an HTTP status or an ``ERROR`` event inside a 200 stream (the
   resourceVersion was compacted away), go back to 1; on any other failure back off
   exponentially, capped at a few seconds, and retry the step that failed.

Requests go through the client's generic ``param_serialize``/``call_api`` with the raw
response kept, so core kinds and custom resources are handled alike and objects are never
turned into the client's typed models (the controller wants dicts, and typed models drop
fields they do not know).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
LIST_READ_TIMEOUT_S = 60.0
WATCH_READ_GRACE_S = 15.0  # beyond timeoutSeconds: a silent watch is only dead after this
INITIAL_BACKOFF_S = 0.2

EventHandler = Callable[[str, dict], None]
RelistHandler = Callable[[list[dict]], None]


def new_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A client from a kubeconfig file, or the in-cluster service account when ``None``
    (a pod, e.g. a KubeRay head)."""
    if kubeconfig is None:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        api_client = client.ApiClient(configuration)
    else:
        api_client = config.new_client_from_config(config_file=kubeconfig, persist_config=False)
    if not api_client.configuration.verify_ssl:
        # The kubeconfig asked for no TLS verification; a warning on every request adds nothing.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return api_client


def raw_call(
    api_client: client.ApiClient, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None, body: str | None = None, timeout: tuple[float, float] | None = None,
) -> Any:  # fmt: skip
    """One request through the client's auth and pool, its response left unread and untyped
    (a watch streams it; the controller wants JSON as sent); raises ``ApiException`` on an
    error status."""
    request = api_client.param_serialize(
        method, path, query_params=query, header_params={"Accept": "application/json", **(headers or {})},
        body=body, auth_settings=["BearerToken"],
    )  # fmt: skip
    response = api_client.call_api(*request, _request_timeout=timeout)
    if not 200 <= response.status <= 299:
        response.read()
        raise ApiException.from_response(http_resp=response, body=None, data=None)
    return response


@dataclass(frozen=True)
class Resource:
    """A collection to follow: ``Resource("", "v1", "pods", namespace="ns")`` for core kinds,
    ``Resource("ray.io", "v1", "rayclusters")`` for others; ``namespace=None`` is every
    namespace (or a cluster-scoped kind)."""

    group: str
    version: str
    plural: str
    namespace: str | None = None
    label_selector: str | None = None

    def path(self) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        scope = f"/namespaces/{self.namespace}" if self.namespace else ""
        return f"{base}{scope}/{self.plural}"

    def describe(self) -> str:
        kind = f"{self.plural}.{self.group}" if self.group else self.plural
        where = f" in {self.namespace}" if self.namespace else ""
        selector = f" ({self.label_selector})" if self.label_selector else ""
        return f"{kind}{where}{selector}"


class _Gone(Exception):
    """The resourceVersion to resume from is too old: only a new list can continue."""


def object_key(obj: dict) -> tuple[str, str]:
    metadata = obj["metadata"]
    return metadata.get("namespace", ""), metadata["name"]


class Informer:
    """A cache of one collection, kept current by a list-then-watch loop in a daemon thread.

    Callbacks run on that thread, after the cache is updated, one at a time:
    ``on_event(type, obj)`` for ``ADDED``/``MODIFIED``/``DELETED`` (watch events, and
    ``DELETED`` for objects a relist no longer finds) and ``on_relist(objects)`` after every
    list. A relist sends no ``ADDED``/``MODIFIED``: ``on_relist`` carries the whole set, for
    level-triggered consumers. A callback that raises is logged and the loop goes on.
    Cached objects are shared, not copied: treat them as read-only.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        resource: Resource,
        on_event: EventHandler | None = None,
        on_relist: RelistHandler | None = None,
        *,
        watch_timeout_s: int = 45,
        page_size: int = 500,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.resource = resource
        self._api = api_client
        self._on_event = on_event
        self._on_relist = on_relist
        self._watch_timeout_s = watch_timeout_s
        self._page_size = page_size
        self._max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], dict] = {}
        self._resource_version = ""  # of the newest list or event seen: where a watch resumes
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: urllib3.BaseHTTPResponse | None = None  # the open watch, for stop() to cut
        self._last_error: str | None = None

    def start(self) -> None:
        """Start following; a stopped informer may start again, and then begins with a relist."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"informer of {self.resource.describe()} is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"informer {self.resource.describe()}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the loop, cutting an open watch short; whether the thread has ended within
        ``timeout_s``. The cache keeps its last content."""
        self._stopping.set()
        response = self._response
        if response is not None:
            response.shutdown()  # unblocks the thread's read at once
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self._thread is None or not self._thread.is_alive()

    def has_synced(self) -> bool:
        """Whether a list has completed (and its callbacks have run) since construction."""
        return self._synced.is_set()

    def wait_synced(self, timeout_s: float | None = None) -> bool:
        return self._synced.wait(timeout_s)

    def items(self) -> list[dict]:
        with self._lock:
            return list(self._cache.values())

    def get(self, namespace: str | None, name: str) -> dict | None:
        """The cached object; ``namespace`` None or "" for cluster-scoped kinds."""
        with self._lock:
            return self._cache.get((namespace or "", name))

    def _run(self) -> None:
        backoff = INITIAL_BACKOFF_S
        must_list = True
        while not self._stopping.is_set():
            try:
                if must_list:
                    self._relist()
                    must_list = False
                self._watch()
                backoff = INITIAL_BACKOFF_S
            except _Gone as gone:
                logger.info("%s: %s; relisting", self.resource.describe(), gone)
                must_list = True
            except Exception as error:  # noqa: BLE001 - any failure is retried; only stop() ends the loop
                if self._stopping.is_set():
                    break
                if isinstance(error, ApiException) and error.status == 410:
                    logger.info("%s: resourceVersion expired (HTTP 410); relisting", self.resource.describe())
                    must_list = True
                    continue
                self._failed(error, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)

    def _failed(self, error: Exception, backoff: float) -> None:
        """Log a failure once until it changes or the informer recovers: a server down for
        minutes must not fill the log."""
        described = f"HTTP {error.status} {error.reason}" if isinstance(error, ApiException) else repr(error)
        if described != self._last_error:
            logger.warning("%s: %s; retrying in %.1fs and backing off", self.resource.describe(), described, backoff)
            self._last_error = described

    def _recovered(self) -> None:
        if self._last_error is not None:
            logger.info("%s: recovered from %s", self.resource.describe(), self._last_error)
            self._last_error = None

    def _get(self, query: list[tuple[str, str]], read_timeout_s: float) -> urllib3.BaseHTTPResponse:
        """GET the collection with ``query``; the raw, unread response (raises ``ApiException``)."""
        if self.resource.label_selector:
            query = [*query, ("labelSelector", self.resource.label_selector)]
        return raw_call(self._api, "GET", self.resource.path(), query=query,
                        timeout=(CONNECT_TIMEOUT_S, read_timeout_s)).response  # fmt: skip

    def _list(self) -> tuple[list[dict], str]:
        """Every object, page by page, and the resourceVersion of the snapshot they belong to.

        List items lack ``kind``/``apiVersion`` (watch events have them); they are filled in
        so consumers see the same shape either way."""
        objects: list[dict] = []
        token = ""
        while True:
            query = [("limit", str(self._page_size))] + ([("continue", token)] if token else [])
            page = json.loads(self._get(query, LIST_READ_TIMEOUT_S).data)
            kind = page.get("kind", "").removesuffix("List")
            for item in page.get("items") or []:
                item.setdefault("apiVersion", page.get("apiVersion"))
                item.setdefault("kind", kind)
                objects.append(item)
            token = page["metadata"].get("continue") or ""
            if not token:
                return objects, page["metadata"]["resourceVersion"]

    def _relist(self) -> None:
        objects, resource_version = self._list()
        self._recovered()
        current = {object_key(obj): obj for obj in objects}
        with self._lock:
            previous, self._cache = self._cache, current
            self._resource_version = resource_version
        for key, obj in previous.items():
            if key not in current:
                self._notify(self._on_event, "DELETED", obj)
        self._notify(self._on_relist, objects)
        self._synced.set()

    def _watch(self) -> None:
        """One watch request, until the server ends it (returns) or it fails (raises)."""
        query = [
            ("watch", "true"), ("allowWatchBookmarks", "true"),
            ("resourceVersion", self._resource_version), ("timeoutSeconds", str(self._watch_timeout_s)),
        ]  # fmt: skip
        response = self._get(query, self._watch_timeout_s + WATCH_READ_GRACE_S)
        self._response = response
        ended = False  # by the server: only then is the connection fit for another request
        try:
            if self._stopping.is_set():  # stop() ran before the response could be cut
                return
            self._recovered()
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return
                if line:
                    self._apply(json.loads(line))
            ended = True
        finally:
            self._response = None
            if not ended:
                # Left mid-stream: back in the pool, the next request would read this watch's rest.
                response.close()
            response.release_conn()

    def _apply(self, event: dict[str, Any]) -> None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":  # a metav1.Status inside a 200 stream
            if obj.get("code") == 410:
                raise _Gone(obj.get("message") or "resourceVersion expired")
            raise RuntimeError(f"watch error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        with self._lock:
            self._resource_version = obj["metadata"]["resourceVersion"]
            if kind == "BOOKMARK":
                return
            if kind == "DELETED":
                self._cache.pop(object_key(obj), None)
            else:
                self._cache[object_key(obj)] = obj
        self._notify(self._on_event, kind, obj)

    def _notify(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the cache
            logger.exception("%s: callback %r failed", self.resource.describe(), callback)
