<#
.SYNOPSIS
  Install the loraspool worker as a Windows service (for people who prefer PowerShell to
  `loraspool service install`; this script checks the machine, then calls it).

.EXAMPLE
  # From an elevated PowerShell, in the loraspool folder:
  .\deploy\windows\install.ps1 -Share \\fileserver\ml\loraspool -Id gpu-desk
  .\deploy\windows\install.ps1 -Share \\fileserver\ml\loraspool -Id gpu-desk -User CORP\svc-loraspool

.NOTES
  The service runs as LocalSystem unless -User is given; LocalSystem reaches the share as the computer
  account (CORP\GPU-DESK$), which only works in a domain where the share grants that account access.
  See deploy/README.md, "Windows: the service account and the share". Not run in CI: no Windows there.
#>
[CmdletBinding()]
param(
  [Parameter(Mandatory = $true)] [string] $Share,
  [string] $Id = $env:COMPUTERNAME.ToLower(),
  [string] $User,
  [string] $Config,
  [string] $Venv = (Join-Path (Split-Path -Parent (Split-Path -Parent $PSScriptRoot)) ".venv"),
  [switch] $NoStart
)
$ErrorActionPreference = "Stop"

function Fail([string] $Message) { Write-Host "install.ps1: $Message" -ForegroundColor Red; exit 2 }

$principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
  Fail "run this from an elevated PowerShell (Run as Administrator): installing a service needs it"
}

$python = Join-Path $Venv "Scripts\python.exe"
if (-not (Test-Path $python)) {
  Fail "no venv at $Venv; create it first (python -m venv .venv; .venv\Scripts\pip install -e .) or pass -Venv"
}

# A mapped drive letter exists only in the session of the person who mapped it; the service would see no share.
if ($Share -match '^[A-Za-z]:') {
  $letter = $Share.Substring(0, 2).ToUpper()
  $mapping = Get-SmbMapping -LocalPath $letter -ErrorAction SilentlyContinue
  if ($mapping) {
    $unc = $mapping.RemotePath + $Share.Substring(2)
    Fail "$Share is on $letter, a mapped network drive, which services cannot see. Use: -Share $unc"
  }
}
elseif (-not $Share.StartsWith('\\')) {
  Fail "-Share must be a UNC path like \\fileserver\ml\loraspool"
}

if (-not (Test-Path -LiteralPath (Join-Path $Share "loraspool.json"))) {
  Write-Warning ("$Share has no loraspool.json as seen by $env:USERNAME (the service account may see it " +
                 "differently); run: loraspool init $Share")
}

& $python -c "import win32serviceutil" 2>$null
if ($LASTEXITCODE -ne 0) {
  Write-Host "installing pywin32 into $Venv"
  & $python -m pip install --quiet "pywin32>=306"
  if ($LASTEXITCODE -ne 0) { Fail "pip install pywin32 failed" }
}

$cli = @("-m", "spooler.cli", "service", "install", "--share", $Share, "--id", $Id)
if ($User) { $cli += @("--user", $User) }       # the CLI asks for the password, without echo
if ($Config) { $cli += @("--config", $Config) }
& $python @cli
if ($LASTEXITCODE -ne 0) { Fail "loraspool service install failed (exit $LASTEXITCODE); see above" }

if ($User) {
  Write-Host ("If the service fails to start with error 1069, give $User the 'Log on as a service' right: " +
              "secpol.msc > Local Policies > User Rights Assignment, or re-enter its password in services.msc.")
}
if (-not $NoStart) {
  & $python -m spooler.cli service start
  Start-Sleep -Seconds 3
  & $python -m spooler.cli service status
  Write-Host "Logs: $env:ProgramData\loraspool\logs\worker.log (unless log_file is set in loraspool.toml)"
}
