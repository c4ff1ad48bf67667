// Command argocd is the part of Argo CD's multicall binary that core mode needs, calling the same
// exported command constructors as upstream's cmd/main.go (a main package cannot be imported).
//
// As upstream, the component is chosen by ARGOCD_BINARY_NAME or else by the name it is started
// as: argocd-application-controller, argocd-repo-server, argocd-git-ask-pass. The repo-server runs
// git with GIT_ASKPASS=argocd and ARGOCD_BINARY_NAME=argocd-git-ask-pass, so this binary must also
// be on PATH as `argocd`. The CLI, the API server, Dex, notifications and the ApplicationSet
// controller are left out: core mode does not run them, and each adds link time.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	appcontroller "github.com/argoproj/argo-cd/v3/cmd/argocd-application-controller/commands"
	gitaskpass "github.com/argoproj/argo-cd/v3/cmd/argocd-git-ask-pass/commands"
	reposerver "github.com/argoproj/argo-cd/v3/cmd/argocd-repo-server/commands"
	"github.com/argoproj/argo-cd/v3/util/log"
)

const binaryNameEnv = "ARGOCD_BINARY_NAME"

func init() {
	// As upstream: klog follows Argo CD's configured log level and format.
	klog.SetLogger(log.NewLogrusLogger(log.NewWithCurrentConfig()))
}

func main() {
	binaryName := filepath.Base(os.Args[0])
	if val := os.Getenv(binaryNameEnv); val != "" {
		binaryName = val
	}

	var command *cobra.Command
	switch binaryName {
	case "argocd-application-controller":
		command = appcontroller.NewCommand()
	case "argocd-repo-server":
		command = reposerver.NewCommand()
	case "argocd-git-ask-pass":
		command = gitaskpass.NewCommand()
		// As upstream for CLI-style commands: the caller (git) reads stdout only.
		command.SilenceErrors = true
		command.SilenceUsage = true
	default:
		fmt.Fprintf(os.Stderr, "argocd: %q is not built here; start it as argocd-application-controller, "+
			"argocd-repo-server or argocd-git-ask-pass (symlink or %s)\n", binaryName, binaryNameEnv)
		os.Exit(2)
	}
	if err := command.Execute(); err != nil {
		if command.SilenceErrors {
			fmt.Fprintln(os.Stderr, err)
		}
		os.Exit(1)
	}
}
