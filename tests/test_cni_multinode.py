"""The multi-node pod network (stages/07b_multinode.py): our plugin on three nodes with
per-node subnets, VXLAN between them flannel's way; pings cross the nodes, and without the
routes they do not."""

from kernel import run_stage



def stage(*args):
    return run_stage("07b_multinode.py", *args)


def test_pods_on_three_nodes_reach_each_other_through_vxlan():
    proc = stage()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    out = proc.stdout
    assert "check: pod1 on node1 got 10.244.1.2 from node1's subnet 10.244.1.0/24: ok" in out
    assert "check: pod2 on node2 got 10.244.2.2 from node2's subnet 10.244.2.0/24: ok" in out
    assert "check: pod3 on node3 got 10.244.3.2 from node3's subnet 10.244.3.0/24: ok" in out
    assert "check: pod3 (node3) reaches pod1 (node1): ok" in out
    assert "check: pod1 (node1) reaches pod2 (node2) across the nodes: ok" in out
    assert "ip netns exec node1 env CNI_COMMAND=ADD CNI_CONTAINERID=pod1" in out
    assert "ip -n node1 route add 10.244.2.0/24 via 10.244.2.0 dev vxlan0 onlink" in out
    assert out.splitlines()[-1].startswith("PASS lesson 07b multinode")


def test_without_routes_the_cross_node_ping_fails():
    proc = stage("--skip", "routes", "-q")
    assert proc.returncode == 1 and "FAIL lesson 07b multinode" in proc.stdout
    assert "pod1 (node1) reaches pod2 (node2) across the nodes" in proc.stdout


def test_dry_run_is_a_script():
    proc = stage("--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "ip -n node1 link add vxlan0 mtu 1450 type vxlan id 1 dstport 4789 local 10.0.8.1 dev eth0 nolearning" \
        in proc.stdout
