"""`fedscan provision ...`: create a federation's certificates, broker files and kits.

fedscan provision --federation F --nodes a,b,c --out DIR [--broker-host H]
                  [--broker-port 8883] [--days N] [--force]
fedscan provision add-node --out DIR --node d
fedscan provision revoke --out DIR --node b [--reason key_compromise]
fedscan provision crl --out DIR [--days N]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedscan.errors import ProvisionError
from fedscan.provision.ca import REASONS
from fedscan.provision.provisioner import (
    DEFAULT_CRL_DAYS,
    DEFAULT_DAYS,
    DEFAULT_PORT,
    add_node,
    provision,
)
from fedscan.provision.revoke import renew_crl, revoke_node


def _nodes(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _create(args: argparse.Namespace) -> int:
    if not args.federation or not args.nodes or args.out is None:
        raise ProvisionError("provision needs --federation F --nodes a,b,c --out DIR")
    outcome = provision(
        args.out,
        args.federation,
        _nodes(args.nodes),
        broker_host=args.broker_host,
        broker_port=args.broker_port,
        broker_install_dir=args.broker_install_dir,
        coordinator=args.coordinator,
        days=args.days,
        crl_days=args.crl_days,
        force=args.force,
    )
    print(outcome.render())
    return 0


def _add_node(args: argparse.Namespace) -> int:
    print(add_node(args.out, args.node, days=args.days).render())
    return 0


def _revoke(args: argparse.Namespace) -> int:
    print(revoke_node(args.out, args.node, reason=args.reason).render())
    return 0


def _crl(args: argparse.Namespace) -> int:
    print(renew_crl(args.out, days=args.days).render())
    return 0


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "provision",
        help="create the CA, broker config, ACL and per-participant kits (TLS + signing keys)",
        description="Without a subcommand: create a new federation in --out. "
        "Subcommands change an existing one.",
    )
    parser.add_argument("--federation", help="federation id (topic prefix fl/<F>/)")
    parser.add_argument("--nodes", help="comma-separated node ids, e.g. a,b,c")
    parser.add_argument("--out", type=Path, help="provisioning folder to create")
    parser.add_argument("--broker-host", default="localhost", help="host name nodes dial")
    parser.add_argument(
        "--broker-port", type=int, default=DEFAULT_PORT, help=f"port nodes dial ({DEFAULT_PORT})"
    )
    parser.add_argument(
        "--broker-install-dir",
        default=None,
        help="absolute path DIR/broker will have on the broker host (default: DIR/broker)",
    )
    parser.add_argument("--coordinator", default="coordinator", help="coordinator's id (CN)")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="certificate lifetime")
    parser.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS, help="CRL lifetime")
    parser.add_argument("--force", action="store_true", help="replace an existing CA and every kit")
    parser.set_defaults(func=_create)
    cmds = parser.add_subparsers(dest="provision_command", metavar="SUBCOMMAND")

    p = cmds.add_parser("add-node", help="issue a kit for one more node and update the ACL")
    p.add_argument("--out", type=Path, required=True, help="existing provisioning folder")
    p.add_argument("--node", required=True, help="id of the new node")
    p.add_argument("--days", type=int, default=None, help="certificate lifetime")
    p.set_defaults(func=_add_node)

    p = cmds.add_parser(
        "revoke", help="revoke a node: CRL, ACL, coordinator's trusted keys, revoked.json"
    )
    p.add_argument("--out", type=Path, required=True, help="existing provisioning folder")
    p.add_argument("--node", required=True, help="id of the node to revoke")
    p.add_argument(
        "--reason",
        choices=sorted(REASONS),
        default="cessation_of_operation",
        help="CRL revocation reason (default cessation_of_operation)",
    )
    p.set_defaults(func=_revoke)

    p = cmds.add_parser("crl", help="re-sign the CRL before it expires (expired = all refused)")
    p.add_argument("--out", type=Path, required=True, help="existing provisioning folder")
    p.add_argument("--days", type=int, default=None, help="CRL lifetime")
    p.set_defaults(func=_crl)
