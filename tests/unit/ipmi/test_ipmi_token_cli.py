"""``dbproxy token issue --ipmi`` (dbproxy/token_cli.py → dbproxy/onetime.py), in process."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from dbproxy.cli import main
from dbproxy.onetime import CodeStore
from dbproxy.identity.keys import TokenKeys


def _config(tmp_path, registry: bool = True) -> str:
    main(["token", "keygen", "--algorithm", "EdDSA", "--key-file", str(tmp_path / "k"),
          "--public-key-file", str(tmp_path / "k.pub")])
    token = {"algorithm": "EdDSA", "key_file": str(tmp_path / "k"), "public_key_file": str(tmp_path / "k.pub")}
    if registry:
        token["registry_file"] = str(tmp_path / "reg.json")
    doc = {"identity": {"token": token}, "roles": {"op": {"routes": ["*"], "bmcs": ["bmc-*"], "ipmi": ["chassis.*"]}},
           "listeners": []}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_issue_prints_only_the_code_and_records_it(tmp_path, capsys):
    config = _config(tmp_path)
    capsys.readouterr()
    assert main(["token", "issue", "--config", config, "--ipmi", "--user", "alice", "--roles", "op",
                 "--target", "bmc-1"]) == 0
    out, err = capsys.readouterr()
    code = out.strip()
    assert len(code) == 20 and code.isalnum() and out == code + "\n"
    assert code not in err and "login name 'alice'" in err
    keys = TokenKeys("EdDSA", public_key=load_pem_public_key((tmp_path / "k.pub").read_bytes()))
    found = CodeStore(str(tmp_path / "reg.json.codes"), keys).lookup("ipmi", "alice")
    assert found.secret.decode() == code and found.roles == ("op",) and found.target == "bmc-1"
    assert found.exp - found.iat == 300


def test_issue_refusals(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["token", "issue", "--config", config, "--ipmi", "--user", "alice", "--roles", "op"]) == 2
    assert "--target is required" in capsys.readouterr().err
    assert main(["token", "issue", "--config", config, "--ipmi", "--user", "a-very-long-user-name", "--roles", "op",
                 "--target", "bmc-1"]) == 2
    assert "longer than 16 bytes" in capsys.readouterr().err
    assert main(["token", "issue", "--config", config, "--code", "nope", "--user", "alice", "--target", "x"]) == 2
    assert "no engine accepts single-use codes of kind 'nope'" in capsys.readouterr().err
    assert main(["token", "issue", "--config", config, "--ipmi", "--user", "alice", "--target", "bmc-1",
                 "--ttl", "10m"]) == 2
    assert "lives at most 300s" in capsys.readouterr().err
    (tmp_path / "noreg").mkdir()
    config = _config(tmp_path / "noreg", registry=False)
    assert main(["token", "issue", "--config", config, "--ipmi", "--user", "alice", "--target", "bmc-1"]) == 2
    assert "neither identity.token.codes_file nor identity.token.registry_file" in capsys.readouterr().err
