"""A minimal CRI client: the pod-sandbox calls kubelet makes to containerd's CRI service
(runtime.v1 over gRPC on containerd's unix socket), for the CRI test and bench.

The messages come from tests/cri_runtime_v1.proto, compiled by grpcio-tools the first time
(cached under tests/__pycache__/, keyed by the proto's hash). grpcio and grpcio-tools are
test-only dependencies (make deps).

As a command (what the tests use: gRPC keeps threads that stay in the mount namespace they
started in, and every test enters a new sandbox, so each call runs in a process of its own):

    python tests/cri.py SOCKET version
    python tests/cri.py SOCKET run NAME [--namespace NS] [--port HOST:CONTAINER[/PROTO]]...
    python tests/cri.py SOCKET status|stop|remove POD_ID

prints one JSON object on stdout; a gRPC error is one line on stderr and exit 1.
"""
import argparse
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "cri_runtime_v1.proto")
SERVICE = "/runtime.v1.RuntimeService/"
TIMEOUT = 120            # RunPodSandbox runs runc and the CNI chain; a loaded machine is slow


def _cache_dir(digest):
    """Where the generated module lives: tests/__pycache__ (gitignored, `make clean`
    removes it), or a temp dir when the checkout is not writable."""
    for base in (os.path.join(HERE, "__pycache__"), tempfile.gettempdir()):
        try:
            os.makedirs(base, exist_ok=True)
            if os.access(base, os.W_OK):
                return os.path.join(base, f"cri-{digest}")
        except OSError:
            continue
    raise RuntimeError("no writable directory for the generated CRI messages")


def messages():
    """The runtime.v1 message module generated from PROTO (protoc runs once per proto content)."""
    with open(PROTO, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    out = _cache_dir(digest)
    if not os.path.exists(os.path.join(out, "cri_runtime_v1_pb2.py")):
        from grpc_tools import protoc
        tmp = tempfile.mkdtemp(prefix=f"cri-{digest}.", dir=os.path.dirname(out))
        try:
            if protoc.main(["protoc", f"-I{HERE}", f"--python_out={tmp}", PROTO]) != 0:
                raise RuntimeError(f"protoc could not compile {PROTO}")
            try:
                os.rename(tmp, out)                    # atomic: a concurrent run finds all or nothing
            except OSError:
                if not os.path.isdir(out):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if out not in sys.path:
        sys.path.insert(0, out)
    return importlib.import_module("cri_runtime_v1_pb2")


class CriClient:
    """RuntimeService calls on containerd's socket, as kubelet makes them."""

    def __init__(self, socket, timeout=TIMEOUT):
        import grpc
        self.pb = messages()
        self.channel = grpc.insecure_channel("unix://" + socket)
        self.timeout = timeout

    def close(self):
        self.channel.close()

    def _call(self, method, request):
        response = getattr(self.pb, method + "Response")
        rpc = self.channel.unary_unary(SERVICE + method, request_serializer=type(request).SerializeToString,
                                       response_deserializer=response.FromString)
        return rpc(request, timeout=self.timeout)

    def version(self):
        r = self._call("Version", self.pb.VersionRequest(version="v1"))
        return {"runtime_name": r.runtime_name, "runtime_version": r.runtime_version,
                "runtime_api_version": r.runtime_api_version}

    def run_pod(self, name, namespace="default", ports=(), dns=None):
        """RunPodSandbox: a pod named NAME; PORTS are (host_port, container_port, "tcp"|"udp").
        Returns the sandbox id (64 hex)."""
        pb = self.pb
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=str(uuid.uuid4()), attempt=0),
            hostname=name, linux=pb.LinuxPodSandboxConfig(),
            port_mappings=[pb.PortMapping(host_port=h, container_port=c,
                                          protocol=pb.Protocol.Value(proto.upper()))
                           for h, c, proto in ports])
        if dns:
            config.dns_config.servers.extend(dns)
        return self._call("RunPodSandbox", pb.RunPodSandboxRequest(config=config)).pod_sandbox_id

    def stop_pod(self, pod_id):
        self._call("StopPodSandbox", self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod_id):
        self._call("RemovePodSandbox", self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def status(self, pod_id):
        """The pod's state, IP and network namespace path (from containerd's verbose info:
        the sandbox's OCI spec names the netns the CNI chain was run in)."""
        r = self._call("PodSandboxStatus", self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
        info = json.loads(r.info.get("info", "{}") or "{}")
        netns = next((n.get("path", "") for n in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
                      if n.get("type") == "network"), "")
        return {"id": r.status.id, "state": self.pb.PodSandboxState.Name(r.status.state),
                "ip": r.status.network.ip, "netns": netns, "pid": info.get("pid", 0)}


def _port(text):
    """HOST:CONTAINER[/PROTO] -> (host, container, proto)."""
    ports, _, proto = text.partition("/")
    host, _, container = ports.partition(":")
    return int(host), int(container), proto or "tcp"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("socket")
    ap.add_argument("call", choices=("version", "run", "status", "stop", "remove"))
    ap.add_argument("target", nargs="?", help="pod name (run) or sandbox id")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--port", action="append", type=_port, default=[])
    ap.add_argument("--dns", action="append", default=[])
    args = ap.parse_args(argv)
    if args.call != "version" and not args.target:
        ap.error(f"{args.call} needs a pod name or sandbox id")
    import grpc
    client = CriClient(args.socket)
    try:
        if args.call == "version":
            out = client.version()
        elif args.call == "run":
            out = {"id": client.run_pod(args.target, args.namespace, args.port, args.dns)}
        elif args.call == "status":
            out = client.status(args.target)
        else:
            getattr(client, args.call + "_pod")(args.target)
            out = {"id": args.target, args.call: True}
    except grpc.RpcError as e:
        sys.exit(f"cri {args.call}: {e.code().name}: {e.details()}")
    finally:
        client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
