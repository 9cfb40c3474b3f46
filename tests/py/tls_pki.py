"""Test certificates in QEMU's x509 directory layout, made with openssl: a CA,
a server certificate for localhost and the addresses the two-node scenarios
use, and a client certificate whose distinguished name is CLIENT_DN (as GnuTLS
formats it, which is what `authz-simple` identities are compared with)."""

import os
import subprocess

CLIENT_DN = "CN=client.test,O=Sluice,C=GB"
SERVER_SAN = "DNS:localhost,DNS:node-a.test,IP:127.0.0.1,IP:10.199.0.1,IP:10.199.0.2"


class PkiError(Exception):
    pass


def _run(*cmd, cwd):
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise PkiError(f"{' '.join(cmd)}: {r.stdout}{r.stderr}")


def make_pki(d, ca_name="Sluice Test CA", days=30):
    """Writes ca-cert.pem, server-{cert,key}.pem, client-{cert,key}.pem in `d`."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "ca.cnf"), "w") as f:
        f.write("[req]\ndistinguished_name=dn\n[dn]\n[v3_ca]\n"
                "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
                "subjectKeyIdentifier=hash\n")
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
         "-out", "ca-cert.pem", "-days", str(days), "-subj", f"/CN={ca_name}",
         "-extensions", "v3_ca", "-config", "ca.cnf", cwd=d)
    for who, eku, san in (("server", "serverAuth", SERVER_SAN), ("client", "clientAuth", None)):
        with open(os.path.join(d, f"{who}.ext"), "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={eku}\n")
            if san:
                f.write(f"subjectAltName={san}\n")
        _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem",
             "-out", f"{who}.csr", "-subj", f"/C=GB/O=Sluice/CN={who}.test", cwd=d)
        _run("openssl", "x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey",
             "ca-key.pem", "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", str(days),
             "-extfile", f"{who}.ext", cwd=d)
    return d
