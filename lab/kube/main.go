// Command kube-apiserver-with-etcd runs a real kube-apiserver (k8s.io/kubernetes,
// cmd/kube-apiserver) on loopback with an embedded etcd, the way envtest does
// with separate binaries. It is test infrastructure only: synfleet's operator
// tests start it (tests/kube/cluster.py) and talk to it like any cluster.
//
// Usage: kube-apiserver-with-etcd -etcd-dir DIR -etcd-port N -- [kube-apiserver flags]
package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func startEtcd(dir string, port int) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "synfleet-test"
	cfg.Dir = dir
	cfg.LogLevel = "error"
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", port)}
	peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", port+1)}
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("etcd in %s not ready after 60 s", dir)
	}
}

func main() {
	own := flag.NewFlagSet("kube-apiserver-with-etcd", flag.ExitOnError)
	dir := own.String("etcd-dir", "", "etcd data directory (required)")
	port := own.Int("etcd-port", 0, "etcd client port on 127.0.0.1; the peer port is the next one (required)")
	own.Parse(os.Args[1:])
	if *dir == "" || *port == 0 {
		fmt.Fprintln(os.Stderr, "-etcd-dir and -etcd-port are required")
		os.Exit(2)
	}
	etcd, err := startEtcd(*dir, *port)
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcd:", err)
		os.Exit(1)
	}
	defer etcd.Close()

	os.Args = append([]string{"kube-apiserver", fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", *port)}, own.Args()...)
	code := cli.Run(app.NewAPIServerCommand())
	etcd.Close()
	os.Exit(code)
}
