package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"segmap/internal/fusedisk"
	"segmap/internal/tlsconf"
)

// resizeTimeout bounds one SIGHUP's Resize (a dial and a stat).
const resizeTimeout = time.Minute

// newFusedisk is 'segmap fusedisk', hidden: the CSI node plugin's bridge
// from an NBD export to a file a loop device can sit on, for machines
// without the nbd module (see package fusedisk).
func newFusedisk() *cobra.Command {
	var nbdAddr, export, dir, certRole, certName, serverName string
	cmd := &cobra.Command{
		Use:    "fusedisk --nbd ADDR --export NAME --dir DIR",
		Short:  "serve an NBD export as the file DIR/disk over FUSE (for a loop device)",
		Hidden: true,
		Long: `Mounts a FUSE file system at DIR holding one file, disk, whose bytes are
the NBD export's, and runs in the foreground. Once mounted it prints
'fusedisk: ready DIR/disk SIZE' on stdout. SIGHUP makes it learn the
export's size again and the file grow (then 'losetup -c' the loop device
and resize2fs). SIGTERM or SIGINT unmount and exit 0 (refused, with a log
line, while a loop device still holds the file); so does an unmount from
outside (umount DIR). With --certs the NBD connection uses STARTTLS and
presents the certificate --cert-role/--cert-name from that directory.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if nbdAddr == "" || export == "" || dir == "" {
				return usageError{errors.New("fusedisk needs --nbd, --export and --dir")}
			}
			cfg := fusedisk.Config{Addr: nbdAddr, Export: export, Dir: dir, Logger: newLogger(cmd.ErrOrStderr())}
			if certs := cmd.Flag("certs").Value.String(); certs != "" {
				m, err := tlsconf.DirFiles(certs, certRole, certName).Load()
				if err != nil {
					return fmt.Errorf("TLS: %w", err)
				}
				cfg.TLS = m.Client(serverName, tlsconf.RoleAgent, tlsconf.RoleStorage)
			}
			return runFusedisk(cmd, cfg)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&nbdAddr, "nbd", "", "NBD server address, host:port (the local agent's)")
	fl.StringVar(&export, "export", "", "name of the NBD export (the disk)")
	fl.StringVar(&dir, "dir", "", "mount point, an existing directory; the file is DIR/disk")
	fl.StringVar(&certRole, "cert-role", tlsconf.RoleAgent, "role of the certificate in --certs to present to the NBD server")
	fl.StringVar(&certName, "cert-name", "", "name of the certificate in --certs to present to the NBD server")
	fl.StringVar(&serverName, "nbd-server-name", "", "name the NBD server's certificate must carry (default: the host of --nbd)")
	return cmd
}

func runFusedisk(cmd *cobra.Command, cfg fusedisk.Config) error {
	log := cfg.Logger
	// The CSI node plugin starts this process detached and may restart
	// while it runs, closing the pipes it read the ready line and the
	// logs from: a log line must then fail (EPIPE), not kill the
	// process (Go's default for fds 1 and 2) and the disk with it.
	signal.Ignore(syscall.SIGPIPE)
	// Signals are caught before the mount, so that one sent as soon as
	// the ready line is out is not lost.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	d, err := fusedisk.Mount(ctx, cfg)
	cancel()
	if err != nil {
		return err
	}
	unmounted := make(chan struct{})
	go func() {
		d.Wait()
		close(unmounted)
	}()
	fmt.Fprintf(cmd.OutOrStdout(), "fusedisk: ready %s %d\n", d.Path(), d.Size())

	for {
		select {
		case <-unmounted:
			return nil
		case s := <-sigs:
			if s == syscall.SIGHUP {
				ctx, cancel := context.WithTimeout(context.Background(), resizeTimeout)
				size, err := d.Resize(ctx)
				cancel()
				if err != nil {
					log.Error("fusedisk: resize failed", "err", err)
				} else {
					log.Info("fusedisk: size", "bytes", size)
				}
				continue
			}
			if err := d.Unmount(); err != nil {
				// Going away would fail every request of the
				// loop device on top: stay until it is detached.
				log.Error("fusedisk: cannot unmount, still serving (detach the loop device first)", "signal", s.String(), "err", err)
				continue
			}
			<-unmounted
			return nil
		}
	}
}
