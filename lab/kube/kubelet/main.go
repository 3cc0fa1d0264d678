// Command kubelet is the real one (k8s.io/kubernetes, cmd/kubelet), built
// from the same module as the lab's control plane so that every component of
// the lab cluster has one version.
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	os.Exit(cli.Run(app.NewKubeletCommand(context.Background())))
}
