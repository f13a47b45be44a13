// Command etcd is the upstream etcd server, built from the Go module proxy as
// the storage behind the local kube-apiserver used by tests and the demo.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
