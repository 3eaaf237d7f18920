"""The CRDs on the real API server, and parity of ``mailflow validate`` with it.

The corpus is every manifest of tests/fixtures/broken and every schema test case of
tests/compiler/test_crd_schema.py (the valid minimal objects too). Each object is sent to
kube-apiserver as a server-side dry-run create with strict field validation (what
``kubectl apply`` does by default) and checked offline by ``mailflow validate -o json``
run as a user runs it. The API server refuses an object exactly when ``mailflow validate``
refuses it on schema or CEL grounds, with the same field paths and messages (up to what
``mailflow validate`` leaves out on purpose: the path repeated inside the message). Findings that need
other objects (a missing profile, a conflict) are not the schema's: the API server accepts
those objects and the operator reports them in status.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from controlplane import ROOT
from kube.cluster import (
    GROUP,
    PLURALS,
    VERSION,
    create_namespace,
    load_yaml_documents,
    status_causes,
    wait_for,
)

pytestmark = pytest.mark.slow

Body = dict[str, Any]
NAMESPACE = "mail"
# Offline findings that depend on other objects: the API server never sees those.
CROSS_DOCUMENT = ("Not found:", "Conflicted:")


def _schema_cases() -> list[tuple[str, Body]]:
    path = ROOT / "tests" / "compiler" / "test_crd_schema.py"
    spec = importlib.util.spec_from_file_location("crd_schema_cases", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = [(str(c[0]), copy.deepcopy(c[1])) for c in module.CASES]
    cases.append(("minimal valid connector", module.connector()))
    cases.append(("minimal valid profile", module.profile()))
    cases += _dkim_key_cases()
    return cases


def _dkim_key(**spec: Any) -> Body:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DkimKey",
        "metadata": {"name": "contoso-s1", "namespace": NAMESPACE},
        "spec": {
            "domain": "contoso.com",
            "selector": "s1",
            "privateKey": {"secretRef": {"name": "dkim-contoso-s1"}},
            **spec,
        },
    }


def _dkim_key_cases() -> list[tuple[str, Body]]:
    """DkimKey bodies: the schema and CEL rules, judged offline and by the API server."""
    return [
        ("minimal valid DKIM key", _dkim_key()),
        (
            "DKIM key with every field",
            _dkim_key(
                algorithm="Ed25519-SHA256",
                subdomains=True,
                signedHeaders=["from", "Subject"],
                canonicalization="simple/relaxed",
                expireAfter="30d",
                enabled=False,
                generate={},
            ),
        ),
        ("DKIM signedHeaders without From", _dkim_key(signedHeaders=["Subject", "To"])),
        ("DKIM algorithm unknown", _dkim_key(algorithm="RSA-SHA1")),
        ("DKIM expireAfter not a duration", _dkim_key(expireAfter="2w")),
        ("DKIM selector with capitals", _dkim_key(selector="S_1")),
        ("DKIM domain wildcard", _dkim_key(domain="*.contoso.com")),
        ("DKIM canonicalization unknown", _dkim_key(canonicalization="relaxed")),
    ]


@dataclass(frozen=True)
class Entry:
    """One object of the corpus: where it came from and its body."""

    label: str
    file: str
    document: int
    body: Body


def _corpus(folder: Path) -> list[Entry]:
    """Writes the corpus into ``folder`` as `mailflow validate` will read it."""
    entries: list[Entry] = []
    for path in sorted((ROOT / "tests" / "fixtures" / "broken").glob("*.yaml")):
        try:
            documents = load_yaml_documents(path)
        except yaml.YAMLError:
            continue  # unparsable.yaml: never reaches an API server
        target = folder / f"broken-{path.name}"
        target.write_text(path.read_text())
        for index, body in enumerate(documents, start=1):
            name = body.get("metadata", {}).get("name", "?")
            entries.append(Entry(f"broken/{path.name}:{name}", str(target), index, body))
    for index, (label, body) in enumerate(_schema_cases()):
        # Offline, each case lives in a namespace of its own so that no two cases conflict
        # with each other (they all claim contoso.com); the field paths do not change.
        offline = copy.deepcopy(body)
        if "namespace" in offline.get("metadata", {}):
            offline["metadata"]["namespace"] = f"case-{index}"
        target = folder / f"case-{index:03d}.yaml"
        target.write_text(yaml.safe_dump(offline, sort_keys=False))
        entries.append(Entry(f"case: {label}", str(target), 1, body))
    return entries


@dataclass(frozen=True)
class Verdict:
    refused: bool
    problems: tuple[tuple[str, str], ...] = ()
    """(field path, message), sorted; messages in one common notation (see _server_message)."""

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted({path for path, _ in self.problems}))


ACCEPTED = Verdict(False)
UNICODE_ESCAPE = re.compile(r"\\u([0-9a-f]{4})")


def _offline_message(message: str) -> str:
    # `mailflow validate` prints non-ASCII pattern characters as \uXXXX escapes.
    return UNICODE_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), message)


def _offline_verdicts(folder: Path) -> dict[tuple[str, int], Verdict]:
    mailflow = Path(sys.executable).parent / "mailflow"
    result = subprocess.run(
        [str(mailflow), "validate", "--output", "json", str(folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode in (0, 1), result.stderr
    found: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for problem in json.loads(result.stdout)["problems"]:
        if str(problem["message"]).startswith(CROSS_DOCUMENT):
            continue
        key = (str(Path(problem["file"]).resolve()), int(problem["document"]))
        found.setdefault(key, []).append(
            (str(problem["path"]), _offline_message(str(problem["message"])))
        )
    return {key: Verdict(True, tuple(sorted(items))) for key, items in found.items()}


UNKNOWN_FIELD = re.compile(r'unknown field "([^"]+)"')
TYPE_SUFFIX = re.compile(r': "[a-z]+"$')
SKIPPED_PREFIX = "Invalid value: null: "


def _server_message(path: str, message: str) -> str:
    """kube-apiserver's message without what `mailflow validate` leaves out on purpose:
    the path again ("spec.x in body should ..."), the type again after a type error, and
    "Invalid value: null: " before the note that rules were skipped."""
    message = message.replace(f"{path} in body ", "")
    if "must be of type" in message:
        message = TYPE_SUFFIX.sub("", message)
    return message.removeprefix(SKIPPED_PREFIX) if path == "" else message


def _server_verdict(client: kubernetes.client.ApiClient, body: Body) -> Verdict:
    api = kubernetes.client.CustomObjectsApi(client)
    group_version = str(body.get("apiVersion", ""))
    group, _, version = group_version.partition("/")
    plural = PLURALS.get(str(body.get("kind")), "unknown")
    namespace = body.get("metadata", {}).get("namespace", NAMESPACE)
    try:
        api.create_namespaced_custom_object(
            group, version, namespace, plural, body, dry_run="All", field_validation="Strict"
        )
    except ApiException as error:
        if error.status == 404:
            # No such group/version: kubectl's own wording, which `mailflow validate` uses.
            kinds = sorted(f"{GROUP}/{VERSION}/{kind}" for kind in PLURALS)
            return Verdict(
                True,
                (
                    (
                        "apiVersion",
                        f'no matches for kind "{body.get("kind")}" in version '
                        f'"{group_version}"; known: {", ".join(kinds)}',
                    ),
                ),
            )
        message = str(json.loads(error.body).get("message", "")) if error.body else ""
        unknown = UNKNOWN_FIELD.findall(message)
        if error.status == 400 and unknown:
            # Strict field validation refuses before the schema runs; same finding.
            return Verdict(
                True,
                tuple(
                    sorted(
                        (u.lstrip("."), "Unknown field: not declared in the schema")
                        for u in unknown
                    )
                ),
            )
        problems = []
        for cause in status_causes(error):
            # The "rules were not checked" note has no field: "<nil>" on the wire.
            path = str(cause.get("field", "")).replace("<nil>", "")
            problems.append((path, _server_message(path, str(cause.get("message", "")))))
        return Verdict(True, tuple(sorted(problems)) or (("?", message),))
    return ACCEPTED


PATTERN_MESSAGE = re.compile(r"^(Invalid value: (?:\"(?:[^\"\\\\]|\\\\.)*\"|\S+): )should match '")


DID_YOU_MEAN = re.compile(r" did you mean [^?]*\?")


def _comparable(problems: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Problems as both sides must agree on them. `mailflow validate` says on purpose what
    the API server does not: a pattern error in words ("must be lower case") instead of the
    regex, "did you mean" after an unknown field, and the rules-were-skipped note once in
    its summary rather than as a problem of its own. The field, the value and the kind of
    error must still be the same."""
    comparable = []
    for path, message in problems:
        if path == "":
            continue
        if message.startswith("Unknown field:"):
            message = "Unknown field"
        message = DID_YOU_MEAN.sub("", message)
        message = message.replace('"; known:', '" known:').replace('": known:', '" known:')
        comparable.append((path, message))
    return sorted(comparable)


def _same_verdict(server: Verdict, local: Verdict) -> bool:
    if server.refused != local.refused:
        return False
    theirs, ours = _comparable(server.problems), _comparable(local.problems)
    if theirs and all(m == "Unknown field" for _, m in theirs):
        # Strict field validation refuses an unknown field before the schema runs; the
        # offline check goes on and reports the schema's findings too. The unknown fields
        # must be the same; the rest is more help, not a different verdict.
        ours = [(p, m) for p, m in ours if m == "Unknown field"]
    if len(theirs) != len(ours):
        return False
    for (server_path, server_message), (path, message) in zip(theirs, ours, strict=True):
        if server_path != path:
            return False
        pattern = PATTERN_MESSAGE.match(server_message)
        if pattern is not None:
            # The API server quotes the regex; the words may differ, the value may not.
            if not message.startswith(pattern.group(1)):
                return False
        elif server_message != message:
            return False
    return True


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Entry], dict[Any, Verdict]]:
    folder = tmp_path_factory.mktemp("parity")
    entries = _corpus(folder)
    return entries, _offline_verdicts(folder)


@pytest.fixture(scope="module")
def mail_namespace(admin: kubernetes.client.ApiClient, crds: list[str]) -> str:
    create_namespace(admin, NAMESPACE, exist_ok=True)
    return NAMESPACE


def test_the_api_server_accepts_every_crd(
    admin: kubernetes.client.ApiClient, crds: list[str]
) -> None:
    assert sorted(crds) == [
        f"dkimkeys.{GROUP}",
        f"multismtpprofiles.{GROUP}",
        f"outboundconnectors.{GROUP}",
    ]
    api = kubernetes.client.ApiextensionsV1Api(admin)
    for name in crds:
        crd = api.read_custom_resource_definition(name)
        assert crd.status is not None
        conditions = {c.type: (c.status, c.reason) for c in crd.status.conditions or []}
        assert conditions["Established"][0] == "True"
        assert conditions["NamesAccepted"][0] == "True"
        # A non-structural schema or a CEL rule over the cost budget shows up here.
        assert "NonStructuralSchema" not in conditions, conditions
        assert [v.name for v in crd.spec.versions if v.served] == [VERSION]


def test_kubectl_applies_the_crds_server_side_as_helm_and_gitops_tools_do(
    control_plane: Any, crds: list[str]
) -> None:
    """Server-side apply re-serialises the CRD as YAML: a raw C1 control character in a
    pattern (what "\\u0080" in the YAML decodes to) made the API server refuse it."""
    kubectl = control_plane.binaries.path("kubectl")
    result = subprocess.run(
        [str(kubectl), "--kubeconfig", str(control_plane.kubeconfig), "apply", "--server-side",
         "--force-conflicts", "-f", str(ROOT / "crds")],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_kubectl_explain_reads_the_schema(control_plane: Any, crds: list[str]) -> None:
    """The API server publishes the CRD's OpenAPI a moment after Established."""
    kubectl = control_plane.binaries.path("kubectl")

    def explain() -> subprocess.CompletedProcess[str] | None:
        result = subprocess.run(
            [str(kubectl), "--kubeconfig", str(control_plane.kubeconfig), "explain",
             "outboundconnector.spec.tls.mode"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        return result if result.returncode == 0 else None

    result = wait_for("kubectl explain to find the schema", explain, timeout=60)
    assert "NameMatch" in result.stdout


def test_api_server_and_mailflow_validate_refuse_the_same_manifests_at_the_same_fields(
    admin: kubernetes.client.ApiClient,
    mail_namespace: str,
    corpus: tuple[list[Entry], dict[tuple[str, int], Verdict]],
) -> None:
    entries, offline = corpus
    differences = []
    for entry in entries:
        server = _server_verdict(admin, entry.body)
        local = offline.get((str(Path(entry.file).resolve()), entry.document), ACCEPTED)
        if not _same_verdict(server, local):
            differences.append(
                f"{entry.label}\n"
                f"    kube-apiserver:    {server.refused} {list(server.problems)}\n"
                f"    mailflow validate: {local.refused} {list(local.problems)}"
            )
    assert len(entries) > 50
    assert not differences, f"{len(differences)} of {len(entries)} differ:\n" + "\n".join(
        differences
    )
