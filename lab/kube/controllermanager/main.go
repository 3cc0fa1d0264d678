// Command kube-controller-manager is the real one (k8s.io/kubernetes,
// cmd/kube-controller-manager). The operator tests run it with only the
// garbage collector, so owner references are honoured as in a cluster while
// the tests play the DaemonSet controller and the kubelet themselves.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
